"""One optimizer step of the real training set-up (train.setup: the DeepSpeed ZeRO engine with the
project's parameter groups, then Trainer.train_step) against a reference from torch alone: the same
model's gradient on the same micro-batches by torch.autograd, then torch.nn.utils.clip_grad_norm_
and one torch.optim.AdamW step, whose groups' LR and weight decay tests/workers/optimizer_step.py
sets from the config (not training/engine.py). Every weight and both Adam moments must agree to
fp32 round-off, in one process and with the experts split over two ranks under ZeRO-2.

The settings make each part show: the gradient norm is ~7x train.grad_clip; betas, eps and weight
decay are neither torch's defaults nor the project's; eps is ~10% of a typical update's denominator
(Adam's first update is lr x sign(g) but for eps, so clipping shows in the weights through it);
betas show in the moments only (bias correction cancels them in a first update); SD-MoE's common
matrices step at train.lr x sdmoe.common_lr_scale."""
import pytest
import torch

from conftest import launch

LR, GRAD_CLIP, WEIGHT_DECAY, COMMON_LR_SCALE = 0.01, 0.1, 0.3, 0.25
# warmup_steps=0: the first step is at train.lr, which the reference uses
STEP = ["train.warmup_steps=0", "train.precision=fp32", "train.micro_batch_size=4", f"train.grad_clip={GRAD_CLIP}",
        f"train.lr={LR}", f"train.weight_decay={WEIGHT_DECAY}", "train.adam_betas=[0.8,0.99]", "train.adam_eps=1e-5"]
SDMOE = ["moe.variant=sdmoe", "sdmoe.rank=4", f"sdmoe.common_lr_scale={COMMON_LR_SCALE}"]
EP2_ZERO2 = ["parallel.expert=2", "parallel.zero_stage=2"]
# Of a tensor's largest entry. The worst seen is 9e-7, exp_avg_sq under EP2 (whose gradient sums in
# another order); the bugs this guards against are 1e-3 and more.
TOLERANCE = 2e-6
DECAY, NO_DECAY = (LR, WEIGHT_DECAY), (LR, 0.0)  # the reference's groups, (lr, weight decay)


def one_step(run_dir, nproc: int, *overrides: str) -> dict:
    out = run_dir.with_suffix(".pt")
    launch(run_dir, nproc, *STEP, *overrides, str(out), module="tests.workers.optimizer_step")
    return torch.load(out, weights_only=False)


def assert_close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], what: str) -> None:
    assert got.keys() == want.keys()
    for name, tensor in want.items():
        error = (got[name].double() - tensor).abs().max().item()
        assert error <= TOLERANCE * tensor.abs().max().item(), f"{what} of {name}: off by {error:.3g}"


def assert_reference_step(run: dict, reference: dict) -> None:
    """`run`'s step is `reference`'s (a one-process run's) torch step."""
    assert reference["reference_norm"] > 5 * GRAD_CLIP  # clipping binds
    assert_close(run["before"], reference["before"], "the initial value")
    assert run["lr"] == LR
    assert run["grad_norm"] == pytest.approx(reference["reference_norm"], rel=TOLERANCE)
    for key in ("param", "exp_avg", "exp_avg_sq"):
        assert_close({name: state[key] for name, state in run["after"].items()},
                     {name: state[key] for name, state in reference["reference"].items()}, key)


@pytest.fixture(scope="module")
def topk(tmp_path_factory):
    return one_step(tmp_path_factory.mktemp("topk") / "run", 1)


def test_topk_step(topk):
    assert topk["groups"] == {DECAY, NO_DECAY}
    assert_reference_step(topk, topk)


def test_sdmoe_step_scales_the_common_lr(tmp_path):
    run = one_step(tmp_path / "run", 1, *SDMOE)
    assert run["groups"] == {DECAY, NO_DECAY, (LR * COMMON_LR_SCALE, WEIGHT_DECAY)}
    assert_reference_step(run, run)


def test_ep2_zero2_step(topk, tmp_path):
    """Experts in DeepSpeed's MoE groups, reduced over expert-DP; dense gradients and Adam state
    partitioned over DP: the same step as one process's reference."""
    assert_reference_step(one_step(tmp_path / "run", 2, *EP2_ZERO2), topk)


def test_ep2_zero2_step_with_per_expert_common_matrices(tmp_path):
    """SD-MoE's per-expert common matrices are expert parameters: at EP2 their scaled LR must hold
    in DeepSpeed's MoE group (one process's reference, where they are dense). Their dense group is
    then empty, and DeepSpeed dropped it after the LR schedule had counted it (the first step failed)."""
    per_expert = [*SDMOE, "sdmoe.common=per_expert"]
    reference = one_step(tmp_path / "reference", 1, *per_expert)
    assert_reference_step(one_step(tmp_path / "run", 2, *per_expert, *EP2_ZERO2), reference)
