"""Diagnostics on hand-made subspaces and routes with known answers."""

import pytest
import torch

from megatron_sdmoe.moe.composition import effective_composition, route_ids
from megatron_sdmoe.moe.diagnostics import mean_off_diagonal, router_specificity, singular_bases, subspace_overlap


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
    assert effective_composition(counts({(7, 0): 10})) == 1.0
    assert effective_composition(counts({(7, 0): 5, (7, 1): 5})) == pytest.approx(2.0)
    # token-weighted: 30 tokens on a pure route (1), 10 on an even two-domain route (2) -> 1.25
    mixed = {(7, 0): 30, (9, 0): 5, (9, 1): 5}
    assert effective_composition(counts(mixed)) == pytest.approx((30 * 1 + 10 * 2) / 40)


def counts(tokens: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """{(route word, label): tokens} as composition.py counts them."""
    return torch.tensor(list(tokens)), torch.tensor(list(tokens.values()))
