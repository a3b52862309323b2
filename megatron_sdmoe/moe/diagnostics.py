"""Specialisation diagnostics (docs/methods.md section 3), for the topk baseline and SD-MoE alike.

Every `moe.diag_interval` steps, per MoE layer and expert projection (gate, up, down):
- expert weight overlap O(i, j) = ||A_i^T A_j||_F^2 / k, A_i the top-k left (and right) singular
  vectors of expert i's effective weight; reported as the mean off-diagonal value;
- gradient subspace alignment: the same overlap on the experts' gradients of that step (summed over
  its micro-batches and the expert-data-parallel ranks: the whole batch's, in every layout);
- router specificity: S(i, j) = ||V_j^T r_i||^2 for the unit router row r_i and expert j's top-k
  right singular vectors of its gate projection; specificity_i = S(i, i) / mean_{j != i} S(i, j);
- SD-MoE layers also report `unique_overlap`: the weight overlap of the unique parts U_e alone
  (the effective weights share C by construction), and `unique_off_complement`: the share of |U_e|^2
  outside the two-sided complement of the current basis, mean over experts and projections (0
  while the decoupling is exact; Adam's updates without sdmoe.project_updates, and refreshes,
  raise it).
Bases are computed where the experts live and gathered over expert parallelism (only k vectors
per expert travel).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.transformer.moe.moe_layer import MoELayer

from megatron_sdmoe.moe.experts import GroupedExperts, by_projection
from megatron_sdmoe.moe.sdmoe import PROJECTIONS, SDMoEExperts
from megatron_sdmoe.runtime.distributed import all_gathered


def subspace_overlap(bases: torch.Tensor) -> torch.Tensor:
    """bases [E, d, k] (orthonormal columns) -> O [E, E], O(i, j) = ||A_i^T A_j||_F^2 / k."""
    k = bases.shape[-1]
    return torch.einsum("idk,jdl->ijkl", bases, bases).pow(2).sum((-2, -1)) / k


def mean_off_diagonal(matrix: torch.Tensor) -> float:
    n = matrix.shape[0]
    return ((matrix.sum() - matrix.diagonal().sum()) / (n * (n - 1))).item()


def router_specificity(router_weight: torch.Tensor, right_bases: torch.Tensor) -> torch.Tensor:
    """router_weight [E, h], right_bases [E, h, k] -> specificity per expert [E]."""
    rows = router_weight / router_weight.norm(dim=-1, keepdim=True)
    scores = torch.einsum("ih,jhk->ijk", rows, right_bases).pow(2).sum(-1)  # S(i, j)
    n = scores.shape[0]
    others = (scores.sum(1) - scores.diagonal()) / (n - 1)
    return scores.diagonal() / others


def singular_bases(matrices: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """matrices [E, m, n] -> top-k left [E, m, k] and right [E, n, k] singular vectors. A direction
    whose singular value is round-off (below torch.linalg.matrix_rank's default tolerance) is zero:
    the gradient of an expert that saw fewer than k tokens, or none, has rank below k, and SVD
    would fill its basis with arbitrary vectors (two idle experts would overlap fully)."""
    matrices = matrices.float()
    u, s, vh = torch.linalg.svd(matrices, full_matrices=False)
    tolerance = s[..., :1] * torch.finfo(matrices.dtype).eps * max(matrices.shape[-2:])
    kept = (s[..., :k] > tolerance).unsqueeze(-2)
    return (u[..., :k] * kept).contiguous(), (vh[..., :k, :].transpose(-2, -1) * kept).contiguous()


def _gathered_bases(matrices: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """singular_bases of each local expert's matrix, gathered over EP (global order)."""
    group = ps.get_expert_model_parallel_group()
    u, v = (all_gathered(local, group) for local in singular_bases(matrices, k))
    return u, v


class Diagnostics:
    def __init__(self, model: torch.nn.Module, k: int):
        self.k = k  # the subspaces' dimension (moe.diag_rank)
        self.layers = [(m.router, m.experts) for m in model.modules()
                       if isinstance(m, MoELayer) and isinstance(m.experts, GroupedExperts)]

    def capture_gradients(self, on: bool) -> None:
        for _, experts in self.layers:
            experts.weight_grads = {} if on else None

    @torch.no_grad()
    def compute(self) -> tuple[dict[str, list[float]], list[torch.Tensor]]:
        """Per-layer scalars and each layer's overlap matrix (left vectors, mean over projections)."""
        scalars: dict[str, list[float]] = {key: [] for key in (
            "expert_overlap", "expert_overlap_right", "grad_alignment", "router_specificity", "unique_overlap",
            "unique_off_complement")}
        matrices = []
        for router, experts in self.layers:
            weights = by_projection(*experts.weights())
            grads = experts.weight_grads or {}
            for grad in grads.values():  # each expert-data-parallel rank saw its own tokens
                dist.all_reduce(grad, group=ps.get_expert_data_parallel_group())
            grads = by_projection(grads["fc1"], grads["fc2"]) if grads else {}
            left_overlaps, right_overlaps, grad_overlaps = [], [], []
            for proj in PROJECTIONS:
                left, right = _gathered_bases(weights[proj], self.k)
                left_overlaps.append(subspace_overlap(left))
                right_overlaps.append(mean_off_diagonal(subspace_overlap(right)))
                if proj == "gate":
                    specificity = router_specificity(router.weight.float(), right).mean().item()
                if grads:
                    grad_overlaps.append(mean_off_diagonal(subspace_overlap(_gathered_bases(grads[proj], self.k)[0])))
            overlap = torch.stack(left_overlaps).mean(0)
            matrices.append(overlap.cpu())
            scalars["expert_overlap"].append(mean_off_diagonal(overlap))
            scalars["expert_overlap_right"].append(sum(right_overlaps) / len(right_overlaps))
            scalars["router_specificity"].append(specificity)
            if grad_overlaps:
                scalars["grad_alignment"].append(sum(grad_overlaps) / len(grad_overlaps))
            if isinstance(experts, SDMoEExperts):
                unique = [mean_off_diagonal(subspace_overlap(_gathered_bases(u, self.k)[0]))
                          for u in experts.uniques().values()]
                scalars["unique_overlap"].append(sum(unique) / len(unique))
                off = experts.unique_off_complement()
                if off is not None:
                    off = all_gathered(off, ps.get_expert_model_parallel_group())
                    scalars["unique_off_complement"].append(off.mean().item())
        return {k: v for k, v in scalars.items() if v}, matrices
