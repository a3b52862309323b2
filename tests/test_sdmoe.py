"""SD-MoE's gradient bookkeeping, basis and initial split, checked against dense linear algebra
(explicit projector matrices, torch.linalg.svd)."""
import pytest
import torch
import torch.nn.functional as F

from megatron_sdmoe.config import SDMoEConfig
from megatron_sdmoe.moe.experts import by_projection
from megatron_sdmoe.moe.sdmoe import (UNSHARDED, DeferredFactors, SDMoEExperts, SpectralSplit, complement,
                                      top_singular_vectors)


def orthonormal(rows: int, k: int, gen: torch.Generator) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(rows, k, generator=gen, dtype=torch.float64))[0]


@pytest.mark.parametrize("groups, per_group", [(1, 5), (5, 1), (2, 3)],
                         ids=["shared by the layer", "per_expert", "shared by each head's bank"])
def test_gradient_routing_bookkeeping(groups, per_group):
    gen = torch.Generator().manual_seed(0)
    m, n, k = 12, 9, 3
    q = torch.stack([orthonormal(m, k, gen) for _ in range(groups)])
    v = torch.stack([orthonormal(n, k, gen) for _ in range(groups)])
    common = torch.zeros(groups, m, n, dtype=torch.float64, requires_grad=True)
    unique = torch.randn(groups * per_group, m, n, generator=gen, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(groups * per_group, m, n, generator=gen, dtype=torch.float64)
    SpectralSplit.apply(common, unique, q.unsqueeze(1), v.unsqueeze(1), UNSHARDED, None, DeferredFactors(),
                        False).backward(grad)  # one block

    eye_m, eye_n = torch.eye(m, dtype=torch.float64), torch.eye(n, dtype=torch.float64)
    q_e, v_e = q.repeat_interleave(per_group, 0), v.repeat_interleave(per_group, 0)  # each expert's group's
    p, r = q_e @ q_e.transpose(-2, -1), v_e @ v_e.transpose(-2, -1)
    expected_unique = (eye_m - p) @ grad @ (eye_n - r)  # the two-sided complement, with explicit projectors
    torch.testing.assert_close(unique.grad, expected_unique, rtol=0, atol=1e-12)
    # nothing is lost: grad C_g + sum_{e in g} grad U_e = sum_{e in g} G_e
    by_group = lambda t: t.unflatten(0, (groups, per_group)).sum(1)  # noqa: E731
    torch.testing.assert_close(common.grad + by_group(unique.grad), by_group(grad), rtol=0, atol=1e-12)
    # the unique gradient lies in the complement on both sides
    assert (q_e.transpose(-2, -1) @ unique.grad).abs().max() < 1e-12
    assert (unique.grad @ v_e).abs().max() < 1e-12


def test_rank_zero_routes_everything_to_the_unique_part():
    grad = torch.randn(3, 6, 4)
    empty_q, empty_v = torch.zeros(6, 0), torch.zeros(4, 0)
    assert torch.equal(complement(grad, empty_q, empty_v), grad)


@pytest.mark.parametrize("power_iterations, oversample", [(0, 2), (2, 8), (4, 0)])
def test_randomized_basis_is_torchs_svd_lowrank(power_iterations, oversample):
    """sdmoe.power_iterations and sdmoe.oversample are svd_lowrank's niter and q - rank, its
    Gaussian draw the one the seed gives (a flat spectrum: each setting changes the basis)."""
    matrix = torch.randn(40, 30, generator=torch.Generator().manual_seed(0))
    left, right = top_singular_vectors(matrix[None], 4, seeds=[7], power_iterations=power_iterations,
                                       oversample=oversample)
    with torch.random.fork_rng():
        torch.manual_seed(7)
        u, _, v = torch.svd_lowrank(matrix, q=4 + oversample, niter=power_iterations)
    torch.testing.assert_close(left[0], u[:, :4], atol=1e-5, rtol=0)
    torch.testing.assert_close(right[0], v[:, :4], atol=1e-5, rtol=0)


def test_randomized_basis_matches_exact_svd():
    gen = torch.Generator().manual_seed(1)
    u, v = orthonormal(40, 8, gen), orthonormal(30, 8, gen)
    spectrum = torch.tensor([50.0, 40, 30, 20, 10, 8, 6, 5], dtype=torch.float64)
    matrix = (u * spectrum) @ v.T + 1e-3 * torch.randn(40, 30, generator=gen, dtype=torch.float64)
    other = torch.randn(40, 30, generator=gen)
    (q_left, _), (q_right, _) = (t.unbind() for t in top_singular_vectors(
        torch.stack([matrix.float(), other]), 4, seeds=[7, 8], power_iterations=2, oversample=8))
    exact_u, _, exact_vh = torch.linalg.svd(matrix.float())
    # same subspaces: the singular values of Q^T Q_exact are all 1
    torch.testing.assert_close(torch.linalg.svdvals(q_left.T @ exact_u[:, :4]), torch.ones(4), atol=1e-4, rtol=0)
    torch.testing.assert_close(torch.linalg.svdvals(q_right.T @ exact_vh[:4].T), torch.ones(4), atol=1e-4, rtol=0)
    # reproducible from its seed alone, whatever else shares the batch
    again = top_singular_vectors(matrix.float()[None], 4, seeds=[7], power_iterations=2, oversample=8)
    assert torch.equal(again[0][0], q_left) and torch.equal(again[1][0], q_right)


def build_layer(single_process_groups, common: str, rank: int = 4) -> SDMoEExperts:
    from megatron.core.transformer.transformer_config import TransformerConfig

    config = TransformerConfig(num_layers=1, hidden_size=24, num_attention_heads=4, ffn_hidden_size=32,
                               moe_ffn_hidden_size=32, num_moe_experts=4, gated_linear_unit=True,
                               activation_func=F.silu, add_bias_linear=False, use_cpu_initialization=True)
    layer = SDMoEExperts(4, config, sdmoe=SDMoEConfig(rank=rank, common=common), seed=3)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        layer.linear_fc1.normal_(0, 0.02, generator=gen)
        layer.linear_fc2.normal_(0, 0.02, generator=gen)
    layer.layer_key = "decoder.layers.0.mlp.experts"
    layer.drawn = by_projection(layer.linear_fc1.detach().clone(), layer.linear_fc2.detach().clone())
    layer.split_initial_weights()
    return layer


@pytest.mark.parametrize("common", ["shared", "per_expert"])
def test_initial_split(single_process_groups, common):
    layer = build_layer(single_process_groups, common)
    for proj, c in layer.commons().items():
        (q, v), u = layer.expert_basis(proj), layer.uniques()[proj]
        singular_values = torch.linalg.svdvals(c.detach().double())
        assert (singular_values > 1e-5 * singular_values.max()).sum(-1).max() <= 4  # rank k (fp32 noise aside)
        torch.testing.assert_close(q.transpose(-2, -1) @ q, torch.eye(4).expand_as(q.transpose(-2, -1) @ q),
                                   atol=1e-5, rtol=0)
        assert (q.transpose(-2, -1) @ u).abs().max() < 1e-6 and (u @ v).abs().max() < 1e-6
        # each effective weight C + U_e keeps its drawn norm, the baseline's scale
        effective = c.repeat_interleave(u.shape[0] // c.shape[0], 0) + u
        torch.testing.assert_close(effective.norm(dim=(-2, -1)), layer.drawn[proj].norm(dim=(-2, -1)),
                                   rtol=1e-5, atol=0)


def train_steps(layer: SDMoEExperts, optimizer: torch.optim.Optimizer, steps: int) -> dict[str, torch.Tensor]:
    """Change of every unique matrix over `steps` optimizer steps on random tokens (fixed basis)."""
    before = {p: u.detach().clone() for p, u in layer.uniques().items()}
    gen = torch.Generator().manual_seed(5)
    tokens_per_expert = torch.tensor([6, 3, 0, 7])
    for _ in range(steps):
        x = torch.randn(16, 24, generator=gen)
        out, _ = layer(x, tokens_per_expert, torch.rand(16, generator=gen))
        optimizer.zero_grad()
        (1e3 * (out ** 2).sum()).backward()  # large steps: fp32 differences of U stay accurate
        optimizer.step()
    return {p: u.detach() - before[p] for p, u in layer.uniques().items()}


def off_complement(layer: SDMoEExperts, deltas: dict[str, torch.Tensor]) -> float:
    """Largest relative size of the part of a change that leaves the complement."""
    worst = 0.0
    for proj, delta in deltas.items():
        q, v = layer.expert_basis(proj)
        outside = delta - complement(delta, q, v)
        worst = max(worst, (outside.norm() / delta.norm()).item())
    return worst


@pytest.mark.parametrize("common", ["shared", "per_expert"])
def test_sgd_changes_stay_in_the_complement(single_process_groups, common):
    layer = build_layer(single_process_groups, common)
    deltas = train_steps(layer, torch.optim.SGD(layer.parameters(), lr=0.5), steps=3)
    assert all(d.norm() > 0 for d in deltas.values())
    assert off_complement(layer, deltas) < 1e-4


def test_adamw_without_projection_leaves_the_complement(single_process_groups):
    """Why sdmoe.project_updates exists: Adam's per-element scaling breaks the decoupling."""
    layer = build_layer(single_process_groups, "shared")
    deltas = train_steps(layer, torch.optim.AdamW(layer.parameters(), lr=1e-2), steps=3)
    assert off_complement(layer, deltas) > 1e-2


def explicit_unique_off_complement(layer: SDMoEExperts) -> torch.Tensor:
    """Per expert, |U - (I - P) U (I - R)|^2 / |U|^2 with dense projector matrices, mean over projections."""
    shares = []
    for proj, unique in layer.uniques().items():
        q, v = (b.double() for b in layer.expert_basis(proj))
        u = unique.detach().double()
        eye_m, eye_n = torch.eye(u.shape[-2], dtype=torch.float64), torch.eye(u.shape[-1], dtype=torch.float64)
        inside = (eye_m - q @ q.mT) @ u @ (eye_n - v @ v.mT)
        shares.append((u - inside).square().sum((-2, -1)) / u.square().sum((-2, -1)))
    return torch.stack(shares).mean(0).float()


@pytest.mark.parametrize("common", ["shared", "per_expert"])
def test_unique_off_complement_diagnostic(single_process_groups, common):
    """0 after the initial split; AdamW then moves U into the common subspace, and the diagnostic
    measures how far, as dense projectors do."""
    layer = build_layer(single_process_groups, common)
    assert layer.unique_off_complement().abs().max() < 1e-6
    train_steps(layer, torch.optim.AdamW(layer.parameters(), lr=1e-2), steps=3)
    share = layer.unique_off_complement()
    assert (share > 1e-3).tolist() == [True, True, False, True]  # expert 2 saw no token: it only decays
    torch.testing.assert_close(share, explicit_unique_off_complement(layer), rtol=1e-4, atol=1e-7)


def test_a_projection_left_out_stays_the_baseline(single_process_groups):
    """sdmoe.projections without `up`: up's C is 0 whatever the initialisation drew, its whole
    gradient goes to U, and gate and down are still decoupled."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    config = TransformerConfig(num_layers=1, hidden_size=24, num_attention_heads=4, ffn_hidden_size=32,
                               moe_ffn_hidden_size=32, num_moe_experts=4, gated_linear_unit=True,
                               activation_func=F.silu, add_bias_linear=False, use_cpu_initialization=True)
    layer = SDMoEExperts(4, config, sdmoe=SDMoEConfig(rank=4, projections=["gate", "down"]), seed=3)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for param in layer.parameters():  # as the model's initialisation: C drawn too
            param.normal_(0, 0.02, generator=gen)
    layer.layer_key = "decoder.layers.0.mlp.experts"
    layer.split_initial_weights()
    commons = layer.commons()
    assert torch.equal(commons["up"], torch.zeros_like(commons["up"]))
    assert commons["gate"].norm() > 0 and commons["down"].norm() > 0

    fc1, fc2 = layer.weights()
    grad1, grad2 = torch.randn(fc1.shape, generator=gen), torch.randn(fc2.shape, generator=gen)
    torch.autograd.backward([fc1, fc2], [grad1, grad2])
    ffn = 32
    assert torch.equal(layer.linear_fc1.grad[:, ffn:], grad1[:, ffn:])  # up: everything to U
    assert torch.equal(layer.common_fc1.grad[:, ffn:], torch.zeros_like(layer.common_fc1.grad[:, ffn:]))
    for proj, grad, unique_grad in (("gate", grad1[:, :ffn], layer.linear_fc1.grad[:, :ffn]),
                                    ("down", grad2, layer.linear_fc2.grad)):
        torch.testing.assert_close(unique_grad, complement(grad, *layer.expert_basis(proj)))


def test_micro_batches_of_a_step_share_w_and_one_routing(single_process_groups):
    """Gradient accumulation: the micro-batches before a step's last reuse the first one's
    W = C + U and leave their gradients' routing to the last (the training loop sets
    more_micro_batches); the step's gradients equal those of computing W and routing anew in every
    micro-batch, up to round-off."""
    layer = build_layer(single_process_groups, "shared")
    tokens_per_expert = torch.tensor([6, 3, 0, 7])

    def off_complement_fc2() -> float:
        """The largest part of U's gradient (down) outside the complement, relative to the largest entry."""
        grad = layer.linear_fc2.grad
        return ((grad - complement(grad, *layer.expert_basis("down"))).abs().max() / grad.abs().max()).item()

    def accumulate(defer: bool) -> tuple[list[torch.Tensor], list, list]:
        layer.zero_grad(set_to_none=True)
        gen, kept, off = torch.Generator().manual_seed(5), [], []
        for micro in range(3):
            layer.more_micro_batches = defer and micro < 2
            out, _ = layer(torch.randn(16, 24, generator=gen), tokens_per_expert, torch.rand(16, generator=gen))
            (out ** 2).sum().backward()
            kept.append(layer.kept[0])
            off.append(off_complement_fc2())
        return [p.grad.clone() for p in layer.parameters()], kept, off

    fresh, nothing, routed = accumulate(defer=False)
    assert nothing == [None, None, None] and max(routed) < 1e-5  # every micro-batch routed
    grads, kept, deferred = accumulate(defer=True)
    assert kept[0].untyped_storage().data_ptr() == kept[1].untyped_storage().data_ptr()  # one W = C + U
    assert kept[2] is None  # released after the step's last micro-batch
    assert deferred[0] > 1e-2 and deferred[2] < 1e-5  # unrouted until the last micro-batch
    for want, got in zip(fresh, grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
