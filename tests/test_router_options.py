"""Router options reach megatron-core's router and keep the loss layout-independent: sigmoid scores
on a Qwen-like model (each routed weight proportional to sigmoid of its logit, not to exp), z-loss,
and an expert capacity that drops tokens. In-process, each setting's value is checked against
megatron-core's own functions or the formula: the load-balancing loss type and coefficient, the
z-loss coefficient, the position drop policy, and the dtype the router scores in."""
import pytest
import torch

from conftest import CONFIG, SMALL, launch, metrics
from megatron_sdmoe.config import load_config
from megatron_sdmoe.models import build_model

OPTIONS = ["moe.score_function=sigmoid", "moe.z_loss_coeff=0.001", "moe.capacity_factor=0.5",
           "moe.token_drop_policy=probs"]


def test_capacity_z_loss_and_sigmoid_scores(tmp_path):
    launch(tmp_path / "one", 1, *OPTIONS)
    launch(tmp_path / "ep2", 2, *OPTIONS, "parallel.expert=2")
    one, ep2 = metrics(tmp_path / "one"), metrics(tmp_path / "ep2")
    # Half an even share per expert keeps at most half of the routed (token, expert) pairs.
    assert all(0.5 <= dropped < 1 for row in one for dropped in row["expert_dropped_fraction"])
    assert all(row["z_loss"] > 0 for row in one)
    # EP2 runs the same micro-batches per rank, so capacity (per rank's tokens) drops the same ones.
    for got, want in zip(ep2, one, strict=True):
        for key in ("loss", "aux_loss", "z_loss", "grad_norm", "expert_dropped_fraction"):
            assert got[key] == pytest.approx(want[key], rel=1e-4, abs=2e-5), (key, got["step"])
    assert one[-1]["loss"] < one[0]["loss"]


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_the_score_function_weights_the_chosen_experts(single_process_groups, score):
    from megatron.core.transformer.moe.moe_layer import MoELayer

    model = build_model(load_config(CONFIG, [*SMALL, f"moe.score_function={score}"]), 512, torch.float32).eval()
    router = next(m.router for m in model.modules() if isinstance(m, MoELayer))
    hidden = router.weight.shape[1]
    x = torch.randn(6, 2, hidden, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        probs, routing_map = router(x)
        logits = x.view(-1, hidden) @ router.weight.T
    topk = int(routing_map.sum(-1)[0])
    assert topk > 1 and torch.equal(routing_map, torch.zeros_like(routing_map).scatter(-1, logits.topk(topk).indices, True))
    scores = torch.sigmoid(logits) if score == "sigmoid" else torch.exp(logits)
    ratios = (probs[routing_map] / scores[routing_map]).view(-1, topk)  # one per token: a normalisation
    torch.testing.assert_close(ratios, ratios[:, :1].expand_as(ratios))


# In-process checks of the router settings' values against megatron-core's own loss and dropping
# functions (or the formula), each on input where the alternative setting gives another answer.

def _router(overrides, dtype=torch.float32):
    from megatron.core.transformer.moe.moe_layer import MoELayer

    model = build_model(load_config(CONFIG, [*SMALL, *overrides]), 512, dtype)
    return next(m.router for m in model.modules() if isinstance(m, MoELayer))


@pytest.fixture
def unit_aux_loss_scale():
    """megatron-core injects the router losses' gradient at MoEAuxLossAutoScaler's scale (a class
    attribute the training loop sets to 1/GAS); 1 here, restored afterwards. The loss tracker is
    emptied before and after."""
    from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    before = MoEAuxLossAutoScaler.main_loss_backward_scale
    MoEAuxLossAutoScaler.main_loss_backward_scale = torch.tensor(1.0)
    get_moe_metrics_tracker().clear()
    yield get_moe_metrics_tracker()
    get_moe_metrics_tracker().clear()
    MoEAuxLossAutoScaler.main_loss_backward_scale = before


def _router_loss_gradient(router, x):
    """The router weight's gradient from the losses megatron-core attaches in a training forward
    (the coefficient-scaled aux / z-loss), with zero gradient through the routing probabilities."""
    router.train()
    probs, _ = router(x)
    (grad,) = torch.autograd.grad((probs * 0).sum(), router.weight)
    return grad


def _skewed_input(router, seq=16, bsz=2):
    """Each sequence leans to a different expert, so per-sequence imbalance exceeds the batch's."""
    hidden = router.weight.shape[1]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(seq, bsz, hidden, generator=gen)
    w = router.weight.detach()
    for b in range(bsz):
        x[:, b] += 3 * w[b] / w[b].norm() ** 2  # logit of expert b raised by 3
    return x


def _load_balancing_loss(probs, routing_map, topk):
    """Switch-Transformer loss E / (k T^2) * sum_e (sum_t p_te) (sum_t routed_te) over tokens [T, E]."""
    tokens, experts = probs.shape
    return experts / (topk * tokens**2) * (probs.sum(0) * routing_map.sum(0)).sum()


@pytest.mark.parametrize("aux_type", ["batch", "sequence"])
def test_aux_loss_type_and_coefficient(single_process_groups, unit_aux_loss_scale, aux_type):
    from megatron.core.transformer.moe.moe_utils import switch_load_balancing_loss_func

    coeff = 0.037  # not the default 0.01
    router = _router([f"moe.aux_loss_type={aux_type}", f"moe.aux_loss_coeff={coeff}", "moe.z_loss_coeff=0"])
    assert not router.calculate_per_token_loss and router.config.moe_z_loss_coeff is None
    x = _skewed_input(router)
    seq, bsz, hidden = x.shape
    topk, experts = router.topk, router.config.num_moe_experts
    got = _router_loss_gradient(router, x)

    weight = router.weight.detach().clone().requires_grad_()
    logits = (x.view(-1, hidden) @ weight.T).view(seq, bsz, experts)
    probs = torch.softmax(logits, -1)
    routed = torch.zeros_like(probs).scatter(-1, logits.topk(topk, -1).indices, 1.0)
    # Batch: one loss over the micro-batch's tokens; sequence: the mean of each sequence's loss.
    batch = _load_balancing_loss(probs.view(-1, experts), routed.view(-1, experts), topk)
    sequence = torch.stack([_load_balancing_loss(probs[:, b], routed[:, b], topk) for b in range(bsz)]).mean()
    # megatron-core's own function agrees with the formula for the batch loss.
    torch.testing.assert_close(switch_load_balancing_loss_func(
        probs.view(-1, experts), routed.view(-1, experts).sum(0), seq * bsz, topk, experts, 1.0), batch)
    assert sequence > 1.2 * batch  # the input tells the two apart
    want = {"batch": batch, "sequence": sequence}[aux_type]
    (want_grad,) = torch.autograd.grad(coeff * want, weight, retain_graph=True)
    (other_grad,) = torch.autograd.grad(coeff * {"batch": sequence, "sequence": batch}[aux_type], weight)
    assert (other_grad - want_grad).abs().max() > 0.1 * want_grad.abs().max()
    torch.testing.assert_close(got, want_grad, rtol=1e-5, atol=1e-6 * want_grad.abs().max().item())

    # megatron-core tracks the loss before its coefficient (what metrics.jsonl reports as aux_loss).
    tracked = sum(entry.values[router.layer_number - 1] for name, entry in unit_aux_loss_scale.metrics.items()
                  if name.endswith("load_balancing_loss"))
    torch.testing.assert_close(tracked, want.detach())


def test_z_loss_coefficient(single_process_groups, unit_aux_loss_scale):
    from megatron.core.transformer.moe.moe_utils import z_loss_func

    coeff = 0.0037  # not 1e-3
    router = _router([f"moe.z_loss_coeff={coeff}", "moe.aux_loss_coeff=0"])
    assert not router.is_aux_loss_enabled()
    x = _skewed_input(router)
    got = _router_loss_gradient(router, x)

    weight = router.weight.detach().clone().requires_grad_()
    logits = x.view(-1, x.shape[-1]) @ weight.T
    z = z_loss_func(logits, coeff)
    torch.testing.assert_close(z, coeff * torch.logsumexp(logits, -1).square().mean())
    (want_grad,) = torch.autograd.grad(z, weight)
    assert want_grad.abs().max() > 0
    torch.testing.assert_close(got, want_grad, rtol=1e-5, atol=1e-6 * want_grad.abs().max().item())
    # The tracker holds z-loss before its coefficient (metrics.jsonl's z_loss).
    torch.testing.assert_close(unit_aux_loss_scale.metrics["z_loss"].values[router.layer_number - 1],
                               (z / coeff).detach())


def test_position_drop_policy(single_process_groups):
    from megatron.core.transformer.moe.moe_utils import apply_router_token_dropping, topk_routing_with_score_function

    capacity = 0.5
    router = _router([f"moe.capacity_factor={capacity}", "moe.token_drop_policy=position"]).eval()
    x = torch.randn(32, 2, router.weight.shape[1], generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        probs, routing_map = router(x)
        logits = router.gating(x).view(-1, router.config.num_moe_experts)
        c = router.config
        full_probs, full_map = topk_routing_with_score_function(
            logits, router.topk, use_pre_softmax=c.moe_router_pre_softmax, num_groups=c.moe_router_num_groups,
            group_topk=c.moe_router_group_topk, scaling_factor=c.moe_router_topk_scaling_factor,
            score_function=router.score_function, expert_bias=router.expert_bias)
    assert torch.equal(full_map, torch.zeros_like(full_map).scatter(-1, logits.topk(router.topk).indices, True))
    # Each expert keeps its capacity (of 64 tokens x top-2 over 8 experts, half an even share: 8) of
    # earliest routed tokens, and all of them where it was routed fewer times.
    earliest = full_map & (full_map.cumsum(0) <= 8)
    assert (full_map.sum(0) > 8).any() and torch.equal(routing_map, earliest)
    torch.testing.assert_close(probs, full_probs * earliest)
    kept_by_probs = apply_router_token_dropping(full_probs, full_map, router.topk, capacity, drop_policy="probs")[1]
    assert not torch.equal(kept_by_probs, earliest)  # the input tells the policies apart


@pytest.mark.parametrize("router_dtype,want", [("fp32", torch.float32), ("fp64", torch.float64),
                                               ("none", torch.bfloat16)])
def test_router_dtype_of_a_bf16_model(single_process_groups, router_dtype, want):
    router = _router([f"moe.router_dtype={router_dtype}"], torch.bfloat16).eval()
    assert router.weight.dtype == torch.bfloat16
    x = torch.randn(8, 2, router.weight.shape[1], generator=torch.Generator().manual_seed(2)).bfloat16()
    logits = []
    gating = router.gating
    router.gating = lambda inp: logits.append(gating(inp)) or logits[-1]
    with torch.no_grad():
        probs, _ = router(x)
    assert logits[0].dtype == want and probs.dtype == want
    # The scores are the product in that precision, of the bf16 input and weight.
    exact = (x.view(-1, x.shape[-1]).double() @ router.weight.detach().double().T).view_as(logits[0])
    torch.testing.assert_close(logits[0], exact.to(want), rtol=0, atol=4 * torch.finfo(want).eps * exact.abs().max().item())
