"""Layout-independent weight initialisation.

megatron-core draws weights from one RNG stream per rank, so the same seed gives different
experts at EP=1 and EP=2. Here every parameter is drawn whole (all TP shards, by its global
expert index) from a generator seeded by (seed, global name), and each rank keeps its shard:
the same seed gives the same model under every TP / EP / ETP layout.
"""
from __future__ import annotations

import math
import re
import zlib

import torch
from megatron.core import parallel_state as ps

from megatron_sdmoe.config import Config

_LOCAL_EXPERT = re.compile(r"\.local_experts\.(\d+)\.")
_OUTPUT_PROJECTIONS = ("linear_proj.weight", "linear_fc2.weight")


def global_name(name: str, num_local_experts: int) -> str:
    """Parameter name as a single process holding every expert would call it."""
    ep_rank = ps.get_expert_model_parallel_rank()
    return _LOCAL_EXPERT.sub(lambda m: f".local_experts.{ep_rank * num_local_experts + int(m.group(1))}.", name)


def shard(full: torch.Tensor, param: torch.nn.Parameter, is_expert: bool) -> torch.Tensor:
    """This rank's slice of a whole parameter, as megatron-core lays out TP shards
    (partition_stride > 1: the SwiGLU fc1 holds [gate_r; up_r] for TP rank r)."""
    if not getattr(param, "tensor_model_parallel", False):
        return full
    if is_expert:
        size, rank = ps.get_expert_tensor_parallel_world_size(), ps.get_expert_tensor_parallel_rank()
    else:
        size, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    stride, dim = param.partition_stride, param.partition_dim
    chunks = full.chunk(size * stride, dim=dim)
    return torch.cat([chunks[rank + k * size] for k in range(stride)], dim=dim)


def full_shape(param: torch.nn.Parameter, is_expert: bool) -> list[int]:
    shape = list(param.shape)
    if getattr(param, "tensor_model_parallel", False):
        size = ps.get_expert_tensor_parallel_world_size() if is_expert else ps.get_tensor_model_parallel_world_size()
        shape[param.partition_dim] *= size
    return shape


@torch.no_grad()
def init_weights(model: torch.nn.Module, cfg: Config) -> None:
    std = cfg.model.init_method_std
    output_std = std / math.sqrt(2.0 * cfg.model.num_layers)  # megatron-core's scaled init
    num_local_experts = cfg.moe.num_experts // cfg.parallel.expert
    for name, param in model.named_parameters():
        is_expert = ".experts." in name
        if param.dim() == 1:  # norm weights (no biases in these families)
            param.fill_(1.0 if "norm" in name else 0.0)
            continue
        key = global_name(name, num_local_experts)
        gen = torch.Generator().manual_seed(cfg.train.seed * 1_000_003 + zlib.crc32(key.encode()))
        full = torch.empty(full_shape(param, is_expert), dtype=torch.float32)
        full.normal_(0.0, output_std if name.endswith(_OUTPUT_PROJECTIONS) else std, generator=gen)
        param.copy_(shard(full, param, is_expert))
