"""Diagnostics on hand-made subspaces and routes with known answers, also through a model's MoE
layers (what `Diagnostics.compute` reads from experts, gradients and routers)."""

import pytest
import torch

from conftest import CONFIG, SMALL
from megatron_sdmoe.config import load_config
from megatron_sdmoe.models import build_model
from megatron_sdmoe.moe.composition import composition_sums, effective_composition, route_ids
from megatron_sdmoe.moe.diagnostics import (Diagnostics, mean_off_diagonal, router_specificity, singular_bases,
                                            subspace_overlap)


def test_overlap_of_identical_orthogonal_and_half_shared_subspaces():
    eye = torch.eye(8)
    bases = torch.stack([eye[:, 0:2], eye[:, 0:2], eye[:, 2:4], torch.stack([eye[:, 0], eye[:, 4]], 1)])
    overlap = subspace_overlap(bases)
    expected = torch.tensor([[1.0, 1.0, 0.0, 0.5], [1.0, 1.0, 0.0, 0.5], [0.0, 0.0, 1.0, 0.0], [0.5, 0.5, 0.0, 1.0]])
    torch.testing.assert_close(overlap, expected)
    assert mean_off_diagonal(overlap) == torch.tensor([1.0, 0.0, 0.5, 0.0, 0.5, 0.0]).mean().item()


def test_bases_of_low_rank_gradients_hold_only_their_range():
    """An expert that saw r < k tokens has a gradient of rank r: its basis is that many vectors of
    the gradient's range (as many as torch.linalg.matrix_rank counts) and zeros, never vectors SVD
    picks from the null space. Two idle experts (zero gradients) do not overlap."""
    torch.manual_seed(0)
    ranks = [0, 0, 1, 3, 6]
    grads = torch.stack([torch.randn(32, r) @ torch.randn(r, 24) for r in ranks])  # rank 0: all zeros
    left, right = singular_bases(grads, 4)
    assert torch.linalg.matrix_rank(grads).tolist() == ranks
    for grad, l, r, rank in zip(grads, left, right, ranks):
        kept = min(rank, 4)
        assert (l.norm(dim=0) > 0).sum() == (r.norm(dim=0) > 0).sum() == kept
        torch.testing.assert_close(l.T @ l, torch.diag(torch.tensor([1.0] * kept + [0.0] * (4 - kept))))
        range_ = torch.linalg.svd(grad)[0][:, :rank]  # the gradient's range holds the kept vectors
        torch.testing.assert_close(range_ @ (range_.T @ l), l, atol=1e-5, rtol=0)
    overlap = subspace_overlap(left)
    assert overlap[0, 1] == 0 and overlap[2, 2].item() == pytest.approx(0.25)  # one direction of k = 4
    full = torch.randn(3, 32, 24)  # full rank: what torch's SVD gives
    torch.testing.assert_close(singular_bases(full, 4)[0].abs(), torch.linalg.svd(full)[0][..., :4].abs())


def test_router_specificity():
    eye = torch.eye(6)
    right_bases = torch.stack([eye[:, 0:1], eye[:, 1:2], eye[:, 2:3]])  # expert j spans e_j
    aligned = torch.stack([eye[0] + 0.1 * eye[1], eye[1] + 0.1 * eye[2], eye[2] + 0.1 * eye[0]])
    spec = router_specificity(aligned, right_bases)
    # S(i, i) = 1 / 1.01, S(i, j) = 0.01 / 1.01 for one j != i and 0 for the other: ratio 1 / 0.005
    torch.testing.assert_close(spec, torch.full((3,), 200.0))
    uniform = router_specificity(torch.ones(3, 6), right_bases)  # a row that favours no expert
    torch.testing.assert_close(uniform, torch.ones(3))


def test_route_composition_known_answers():
    # 100 experts: the sets {0, 70} and {0, 71} differ only past the first 63-bit word
    routing = torch.zeros(3, 100, dtype=torch.bool)
    routing[0, [0, 70]] = routing[1, [0, 71]] = routing[2, [0, 70]] = True
    ids = route_ids(routing)
    assert ids.shape == (3, 2) and torch.equal(ids[0], ids[2]) and not torch.equal(ids[0], ids[1])
    # one route serving one domain: 1; one route with two domains in equal shares: 2
    assert n_eff(counts({(7, 0): 10})) == 1.0
    assert n_eff(counts({(7, 0): 5, (7, 1): 5})) == pytest.approx(2.0)
    # token-weighted: 30 tokens on a pure route (1), 10 on an even two-domain route (2) -> 1.25
    mixed = {(7, 0): 30, (9, 0): 5, (9, 1): 5}
    assert n_eff(counts(mixed)) == pytest.approx((30 * 1 + 10 * 2) / 40)


def n_eff(counts: tuple[torch.Tensor, torch.Tensor]) -> float:
    return effective_composition(*composition_sums(counts))


def counts(tokens: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """{(route word, label): tokens} as composition.py counts them."""
    return torch.tensor(list(tokens)), torch.tensor(list(tokens.values()))


def rank_two(experts: int, rows: int, cols: int, sharing: list[int]) -> torch.Tensor:
    """[experts, rows, cols]: expert e's matrix has singular values 2, 1 with right singular vectors
    e_2e, e_2e+1 and left ones e_2l, e_2l+1, where l = e except for the experts in `sharing`,
    which all take the left vectors of its first."""
    matrices = torch.zeros(experts, rows, cols)
    for e in range(experts):
        left = sharing[0] if e in sharing else e
        matrices[e, 2 * left, 2 * e], matrices[e, 2 * left + 1, 2 * e + 1] = 2.0, 1.0
    return matrices


def test_compute_reads_weights_gradients_and_routers(single_process_groups):
    """Each layer's experts share left subspaces as designed (weights: experts 0, 1; gradients:
    2, 3, 4), no right subspaces, and router row i leans to expert i's gate input subspace (and a
    quarter as much to expert i + 1's): the known overlaps, alignment and specificity."""
    model = build_model(load_config(CONFIG, SMALL), 512, torch.float32)
    diagnostics = Diagnostics(model, k=2)
    for router, experts in diagnostics.layers:
        n, two_ffn, hidden = experts.linear_fc1.shape
        ffn = two_ffn // 2

        def fc1_fc2(sharing):  # gate and up stacked as fc1 [E, 2f, h], down [E, h, f]
            return {"fc1": torch.cat([rank_two(n, ffn, hidden, sharing)] * 2, dim=1),
                    "fc2": rank_two(n, hidden, ffn, sharing)}

        with torch.no_grad():
            weights = fc1_fc2([0, 1])
            experts.linear_fc1.copy_(weights["fc1"])
            experts.linear_fc2.copy_(weights["fc2"])
            eye = torch.eye(hidden)
            router.weight.copy_(torch.stack([eye[2 * i] + 0.5 * eye[2 * ((i + 1) % n)] for i in range(n)]))
        experts.weight_grads = fc1_fc2([2, 3, 4])
    scalars, matrices = diagnostics.compute()
    pairs = n * (n - 1)
    layers = len(diagnostics.layers)
    assert layers == 2 and scalars["expert_overlap"] == pytest.approx([2 / pairs] * layers)
    assert scalars["expert_overlap_right"] == [0.0] * layers
    assert scalars["grad_alignment"] == pytest.approx([6 / pairs] * layers)
    # S(i, i) = 1 / 1.25, S(i, i + 1) = 0.25 / 1.25, other S(i, j) 0
    assert scalars["router_specificity"] == pytest.approx([0.8 / (0.2 / (n - 1))] * layers)
    expected = torch.eye(n)
    expected[0, 1] = expected[1, 0] = 1.0
    for matrix in matrices:
        torch.testing.assert_close(matrix, expected)


def test_captured_gradients_are_the_weights_gradients(single_process_groups):
    """What the diagnostics collect in a step (hooks on the effective weights) is autograd's dL/dW."""
    model = build_model(load_config(CONFIG, SMALL), 512, torch.float32)
    diagnostics = Diagnostics(model, k=2)
    diagnostics.capture_gradients(True)
    experts = diagnostics.layers[0][1]
    n, _, hidden = experts.linear_fc1.shape
    gen = torch.Generator().manual_seed(0)
    tokens_per_expert = torch.tensor([3, 0, 5, 1] + [2] * (n - 4))
    for _ in range(2):  # summed over a step's micro-batches
        tokens = int(tokens_per_expert.sum())
        out, _ = experts(torch.randn(tokens, hidden, generator=gen), tokens_per_expert, torch.rand(tokens, generator=gen))
        (out ** 2).sum().backward()
    torch.testing.assert_close(experts.weight_grads["fc1"], experts.linear_fc1.grad)
    torch.testing.assert_close(experts.weight_grads["fc2"], experts.linear_fc2.grad)
    diagnostics.capture_gradients(False)
    assert experts.weight_grads is None
