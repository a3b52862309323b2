"""Activation recomputation (train.recompute, megatron-core's) trains the same model: every logged
metric of 4 steps through the real entry point equals the run that keeps its activations (to
fp32 round-off: a recomputed part's input gradient may be summed in another order), for
each family and method (shared experts, dense first layer, MTP, bias balancing, SD-MoE across a
basis refresh with several micro-batches per step, head-wise routing with SD-MoE, diagnostics),
and at EP2 and TP2 (SD-MoE) it equals one process. In-process, it saves what the estimator says it saves."""
import pytest
import torch

from conftest import REPO, launch, metrics

CONFIGS = {"qwen2": ("tiny-qwen2-moe.yaml", ["moe.shared_expert_ffn_hidden_size=128"]),
           "deepseek": ("tiny-deepseek.yaml", ["model.num_layers=3", "model.dense_ffn_hidden_size=256"]),
           # a refresh at step 2, 4 micro-batches a step, the diagnostics' gradients and route counts at step 4
           "sdmoe": ("tiny-qwen3-moe.yaml", ["moe.variant=sdmoe", "sdmoe.refresh_interval=2", "moe.diag_interval=4"]),
           "headwise_sdmoe": ("tiny-headwise.yaml", ["moe.variant=headwise_sdmoe", "sdmoe.refresh_interval=2"])}
# name: (config, recompute settings)
CASES = {
    "qwen2 selective shared_experts (gated)": ("qwen2", ["train.recompute=selective",
                                                          "train.recompute_modules=[shared_experts]"]),
    "deepseek full (MTP included)": ("deepseek", ["train.recompute=full"]),
    "deepseek selective moe, mlp": ("deepseek", ["train.recompute=selective", "train.recompute_modules=[moe, mlp]"]),
    "sdmoe selective moe": ("sdmoe", ["train.recompute=selective", "train.recompute_modules=[moe]"]),
    "headwise_sdmoe full": ("headwise_sdmoe", ["train.recompute=full"]),
}
TIMINGS = {"tokens_per_s", "tflops_per_gpu", "mfu", "max_memory_gib"}


def run(run_dir, name: str, nproc: int = 1, *overrides: str) -> list[dict]:
    config, shrink = CONFIGS[name]
    launch(run_dir, nproc, *shrink, *overrides, config=REPO / "configs" / config)
    return metrics(run_dir)


@pytest.fixture(scope="module")
def kept(tmp_path_factory):
    """Each config's run without recomputation, once for the module."""
    runs = {}

    def get(name: str) -> list[dict]:
        if name not in runs:
            runs[name] = run(tmp_path_factory.mktemp(name), name)
        return runs[name]
    return get


@pytest.mark.parametrize("case", CASES)
def test_recomputed_run_equals_the_run_that_keeps_activations(case, kept, tmp_path):
    name, settings = CASES[case]
    got, want = run(tmp_path, name, 1, *settings), kept(name)
    assert [r["step"] for r in got] == [r["step"] for r in want] == [1, 2, 3, 4]
    if name == "sdmoe":  # the diagnostics ran at step 4
        assert "route_neff" in want[-1]
    for g, w in zip(got, want):
        assert g.keys() == w.keys()
        for key in w.keys() - TIMINGS:  # summation order may differ where a recomputed part's input grad joins
            assert flat(g[key]) == pytest.approx(flat(w[key]), rel=1e-6, abs=1e-7), (case, g["step"], key)


def flat(value):
    """A per-expert value (a list per layer) as one list, for pytest.approx."""
    return [x for row in value for x in row] if isinstance(value, list) and isinstance(value[0], list) else value


@pytest.mark.parametrize("settings", [
    ["parallel.expert=2", "train.recompute=full", "train.recompute_layers=1"],
    ["parallel.tensor=2", "train.recompute=selective", "train.recompute_modules=[moe]"]],
    ids=["EP2 full, first layer only", "TP2 (sequence parallel) selective moe"])
def test_recomputed_parallel_sdmoe_equals_one_process(settings, kept, tmp_path):
    """Recomputation re-runs the token dispatcher's all-to-alls (and sequence parallelism's
    gathers) in backward; the tolerances of test_parallel_parity.py."""
    got, want = run(tmp_path, "sdmoe", 2, *settings), kept("sdmoe")
    for g, w in zip(got, want):
        assert g["loss"] == pytest.approx(w["loss"], abs=2e-5), g["step"]
        assert g["aux_loss"] == pytest.approx(w["aux_loss"], abs=2e-4), g["step"]
        assert g["grad_norm"] == pytest.approx(w["grad_norm"], rel=1e-4), g["step"]


# -- memory: what the forward keeps, measured, against the estimator --------------------------

MEMORY_CASES = {"qwen3": ("tiny-qwen3-moe.yaml", []), "qwen2": ("tiny-qwen2-moe.yaml", []),
                "deepseek": ("tiny-deepseek.yaml", []), "sdmoe": ("tiny-qwen3-moe.yaml", ["moe.variant=sdmoe"]),
                "sdmoe per-expert C": ("tiny-deepseek.yaml", ["moe.variant=sdmoe", "sdmoe.common=per_expert"]),
                "headwise": ("tiny-headwise.yaml", [])}
MODES = {"full": ["train.recompute=full"], "full, first layer": ["train.recompute=full", "train.recompute_layers=1"],
         "moe": ["train.recompute=selective", "train.recompute_modules=[moe]"],
         "shared_experts": ["train.recompute=selective", "train.recompute_modules=[shared_experts]"],
         "mlp": ["train.recompute=selective", "train.recompute_modules=[mlp]"]}


def kept_bytes(model, tokens: torch.Tensor) -> int:
    """Bytes held for backward after the forward pass of a step's first micro-batch (of several):
    what autograd saved and SD-MoE's W = C + U, kept for the step's next micro-batch; distinct
    storages, parameters and buffers left out, counted at the end (megatron-core's recomputation
    may free a storage it saved)."""
    from megatron_sdmoe.moe.sdmoe import sdmoe_modules

    own = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    held = {}

    def hold(tensor):
        if tensor.untyped_storage().data_ptr() not in own:
            held[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage()
        return tensor

    for layer in sdmoe_modules(model):
        layer.more_micro_batches = True
    with torch.autograd.graph.saved_tensors_hooks(hold, lambda tensor: tensor):
        model(tokens, torch.arange(tokens.shape[1]).expand_as(tokens), None, labels=tokens)
    for layer in sdmoe_modules(model):
        for weight in layer.kept:
            hold(weight)
    return sum(storage.nbytes() for storage in held.values())


@pytest.mark.parametrize("name", MEMORY_CASES)
def test_recomputation_saves_what_the_estimate_says(single_process_groups, name):
    """For every mode, the estimated saving (what the forward no longer keeps) is within 20% of the
    measured one, and zero exactly when nothing is recomputed (no shared expert, no dense layer).
    20%: the per-layer model leaves out small and CPU-only tensors (QK-norm inputs, RoPE tables,
    the CPU attention kernel's score matrix) and counts the routed experts' outputs, which these
    experts do not keep."""
    from megatron_sdmoe.config import load_config
    from megatron_sdmoe.errors import UserError
    from megatron_sdmoe.estimate import saved_activation_bytes
    from megatron_sdmoe.models import build_model
    from megatron_sdmoe.runtime import seed_everything
    from megatron_sdmoe.validation import validate

    vocab, (config, overrides) = 1000, MEMORY_CASES[name]
    tokens = torch.randint(0, vocab, (2, 32), generator=torch.Generator().manual_seed(0))

    def measure(*settings):
        cfg = load_config(REPO / "configs" / config, [*overrides, "data.seq_length=32", "train.micro_batch_size=2",
                                                      *settings])
        validate(cfg, 1)
        seed_everything(cfg.train.seed)
        return saved_activation_bytes(cfg, vocab, 4)[0], kept_bytes(build_model(cfg, vocab, torch.float32), tokens)

    estimated_none, measured_none = measure()
    for mode, settings in MODES.items():
        try:
            estimated, measured = measure(*settings)
        except UserError as e:  # a first-layers-only recompute with MTP layers (megatron-core would skip the
            # MTP), or a module the model lacks (recomputing it would save nothing)
            assert (mode == "full, first layer" and config == "tiny-deepseek.yaml") or "would save nothing" in str(e)
            continue
        saving, measured_saving = estimated_none - estimated, measured_none - measured
        assert (saving == 0) == (measured_saving == 0), (mode, saving, measured_saving)
        assert saving == pytest.approx(measured_saving, rel=0.2), mode
