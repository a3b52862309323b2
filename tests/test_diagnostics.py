"""Diagnostics on hand-made subspaces and routes with known answers."""
from collections import Counter

import pytest
import torch

from megatron_sdmoe.moe.composition import effective_composition, route_ids
from megatron_sdmoe.moe.diagnostics import mean_off_diagonal, router_specificity, subspace_overlap


def test_overlap_of_identical_orthogonal_and_half_shared_subspaces():
    eye = torch.eye(8)
    bases = torch.stack([eye[:, 0:2], eye[:, 0:2], eye[:, 2:4], torch.stack([eye[:, 0], eye[:, 4]], 1)])
    overlap = subspace_overlap(bases)
    expected = torch.tensor([[1.0, 1.0, 0.0, 0.5], [1.0, 1.0, 0.0, 0.5], [0.0, 0.0, 1.0, 0.0], [0.5, 0.5, 0.0, 1.0]])
    torch.testing.assert_close(overlap, expected)
    assert mean_off_diagonal(overlap) == torch.tensor([1.0, 0.0, 0.5, 0.0, 0.5, 0.0]).mean().item()


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
    assert effective_composition(Counter({(("a",), 0): 10})) == 1.0
    assert effective_composition(Counter({(("a",), 0): 5, (("a",), 1): 5})) == pytest.approx(2.0)
    # token-weighted: 30 tokens on a pure route (1), 10 on an even two-domain route (2) -> 1.25
    mixed = Counter({(("a",), 0): 30, (("b",), 0): 5, (("b",), 1): 5})
    assert effective_composition(mixed) == pytest.approx((30 * 1 + 10 * 2) / 40)
