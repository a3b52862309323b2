"""Parametric singularity smoothing (docs/methods.md section 5, arXiv 2602.01308; docs/smoothing.md).

A loss spike shows first as a spike of the gradient norm, and goes with weight matrices whose
spectrum is dominated by a few singular values (a low stable rank SR(W) = ||W||_F^2 / sigma_1^2).
When the global gradient norm of a step exceeds `smoothing.threshold` times its running mean,
every weight matrix of the transformer layers is smoothed after the optimizer step: its top
k = floor(SR(W)) singular values are clipped to the (k+1)-th. Singular vectors are kept, so a
matrix in a subspace stays in it (SD-MoE's unique matrices stay in the complement of the common
basis, and the common matrices keep their basis).

Each matrix is smoothed whole (gathered over its tensor-parallel group: the shards' order only
permutes rows or columns, which the smoothing commutes with), on DeepSpeed's fp32 master weights
and mirrored into the model's, so every layout smooths the same model. Embeddings, the output
layer and routers are left alone (our choice: a vocabulary-sized SVD per spike, and routing).
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param
from megatron.core import parallel_state as ps

from megatron_sdmoe.config import SmoothingConfig
from megatron_sdmoe.moe.sdmoe import Shards

_LEFT_ALONE = ("embedding", "output_layer", "router")


def clip_top_singular_values(matrices: torch.Tensor) -> torch.Tensor:
    """Each matrix [..., m, n] with its top floor(SR) singular values clipped to the next one."""
    u, s, vh = torch.linalg.svd(matrices.float(), full_matrices=False)
    top = s[..., :1]
    stable_rank = (s * s).sum(-1) / (top[..., 0] * top[..., 0]).clamp_min(torch.finfo(s.dtype).tiny)
    # never clip to a singular value that is round-off: k < the numerical rank (SR reaches the rank
    # only when the nonzero values are all equal, and then nothing changes)
    rank = (s > top * max(matrices.shape[-2:]) * torch.finfo(s.dtype).eps).sum(-1)
    k = torch.minimum(stable_rank.floor().long(), rank - 1).clamp_min(0)
    clipped = torch.minimum(s, s.gather(-1, k[..., None]))
    return (u * clipped[..., None, :]) @ vh


def _shards(name: str, param: torch.nn.Parameter) -> Shards:
    if not getattr(param, "tensor_model_parallel", False):
        return Shards(None, None)
    group = ps.get_expert_tensor_parallel_group() if ".experts." in name else ps.get_tensor_model_parallel_group()
    return Shards(group, "rows" if param.partition_dim == param.dim() - 2 else "cols")


class SingularitySmoother:
    """Watches the global gradient norm after every optimizer step and smooths on a spike. Its
    state (the running mean and the count of smoothed steps) is saved with the checkpoints."""

    def __init__(self, cfg: SmoothingConfig, model: torch.nn.Module, device: torch.device, state: dict | None):
        self.cfg, self.device = cfg, device
        self.matrices = [(param, _shards(name, param)) for name, param in model.named_parameters()
                         if param.dim() >= 2 and not any(part in name for part in _LEFT_ALONE)]
        state = state or {"ema": 0.0, "steps": 0, "smoothed_steps": 0}
        self.ema, self.steps, self.smoothed_steps = state["ema"], state["steps"], state["smoothed_steps"]

    def state(self) -> dict:
        return {"ema": self.ema, "steps": self.steps, "smoothed_steps": self.smoothed_steps}

    @property
    def mean(self) -> float:
        """The running mean of the gradient norm (bias-corrected EMA; NaN before the first step)."""
        return self.ema / (1.0 - self.cfg.ema_decay ** self.steps) if self.steps else math.nan

    def after_step(self, grad_norm: float) -> dict[str, float]:
        """Called on every rank after every optimizer step (a collective): smooth on a spike; the
        metrics `smoothed_steps` (so far) and `grad_norm_mean`."""
        spike = math.isfinite(grad_norm) and grad_norm > self.cfg.threshold * self.mean  # False while NaN
        flag = torch.tensor([float(spike)], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # every rank smooths, or none (round-off in the norm)
        if flag.item():
            self.smooth()
            self.smoothed_steps += 1
        elif math.isfinite(grad_norm):  # a spike does not raise the bar for the next one
            self.ema = self.cfg.ema_decay * self.ema + (1.0 - self.cfg.ema_decay) * grad_norm
            self.steps += 1
        return {"smoothed_steps": self.smoothed_steps, "grad_norm_mean": self.mean}

    @torch.no_grad()
    def smooth(self) -> None:
        for param, shards in self.matrices:
            master = safe_get_full_fp32_param(param)  # this rank's shard, whole across ZeRO partitions
            smoothed = shards.local_matrix(clip_top_singular_values(shards.gather(master))).to(master.dtype)
            safe_set_full_fp32_param(param, smoothed)
            param.copy_(smoothed.to(param.dtype))
