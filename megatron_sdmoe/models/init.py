"""Layout-independent weight initialisation.

megatron-core draws weights from one RNG stream per rank, so the same seed gives different
experts at EP=1 and EP=2. Here every weight is drawn whole (all TP shards, by its global expert
index) from a generator seeded by (seed, global name), and each rank keeps its shard: the same seed
gives the same model under every TP / EP / ETP layout and either expert implementation.
With `model.init_from` the whole tensors come from files instead (an imported model), and each
rank keeps its shard the same way.
"""
from __future__ import annotations

import math
import re
import zlib
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Callable

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from tqdm import tqdm

from megatron_sdmoe.config import Config, routed_experts
from megatron_sdmoe.convert.weights import WeightDirectory
from megatron_sdmoe.errors import UserError
from megatron_sdmoe.runtime.distributed import cores_per_local_rank

_LOCAL_EXPERT = re.compile(r"\.local_experts\.(\d+)\.")
_OUTPUT_PROJECTIONS = ("linear_proj", "linear_fc2")


def tp_size_and_rank(is_expert: bool) -> tuple[int, int]:
    """The size of this rank's TP group (expert TP for experts) and its rank in it."""
    if is_expert:
        return ps.get_expert_tensor_parallel_world_size(), ps.get_expert_tensor_parallel_rank()
    return ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()


def shard(full: torch.Tensor, dim: int, stride: int, is_expert: bool) -> torch.Tensor:
    """This rank's slice of a whole weight, as megatron-core lays out TP shards
    (stride > 1: the SwiGLU fc1 holds [gate_r; up_r] for TP rank r)."""
    size, rank = tp_size_and_rank(is_expert)
    chunks = full.chunk(size * stride, dim=dim)
    return torch.cat([chunks[rank + k * size] for k in range(stride)], dim=dim)


def draw(key: str, local: torch.Tensor, param: torch.nn.Parameter, dim_offset: int, is_expert: bool,
         seed: int, std: float) -> torch.Tensor:
    """The whole weight called `key`, drawn from its own generator, sharded like `local`."""
    shape = list(local.shape)
    parallel = getattr(param, "tensor_model_parallel", False)
    dim = param.partition_dim - dim_offset if parallel else None
    if parallel:
        shape[dim] *= tp_size_and_rank(is_expert)[0]
    gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(key.encode()))
    full = torch.empty(shape, dtype=torch.float32).normal_(0.0, std, generator=gen)
    return shard(full, dim, param.partition_stride, is_expert) if parallel else full


def local_part(name: str, full: torch.Tensor, split: dict, shape: torch.Size, offset: int = 0) -> torch.Tensor:
    """This rank's part, of shape `shape`, of the whole tensor `full` split as `split` (split_record):
    its experts (`offset`: the global index of full's first), its TP shard."""
    if split["experts"]:
        first = split["first"] - offset
        full = full[first:first + shape[0]]
    if split["dim"] is not None:
        full = shard(full, split["dim"], split["stride"], ".experts." in name)
    if full.shape != shape:
        raise UserError(f"model.init_from: {name} has shape {tuple(full.shape)} where this model needs "
                        f"{tuple(shape)} on this rank: convert weights of this model's sizes")
    return full


def split_record(tensor: torch.Tensor) -> dict:
    """How a layout splits a weight: its TP partition dim and stride, whether dim 0 stacks experts
    (split over EP), and the global index of this rank's first."""
    stacked = getattr(tensor, "stacked_experts", False)
    return {"dim": tensor.partition_dim if getattr(tensor, "tensor_model_parallel", False) else None,
            "stride": getattr(tensor, "partition_stride", 1), "experts": stacked, "weight": True,
            "first": ps.get_expert_model_parallel_rank() * tensor.shape[0] if stacked else 0}


def weight_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What a model's weights are, for checkpoints' split records and conversion: its parameters
    and the routing biases of auxiliary-loss-free balancing (buffers, but learnt state)."""
    return {**dict(model.named_parameters()),
            **{name: b for name, b in model.named_buffers() if name.endswith("expert_bias")}}


def split_tensors(model: torch.nn.Module) -> dict[str, tuple[torch.Tensor, dict]]:
    """Every tensor a layout splits, with its split record: the weights, and the SD-MoE bases (state
    that resuming at another layout re-cuts; conversion reads only the weights)."""
    tensors = {name: (t, split_record(t)) for name, t in weight_tensors(model).items()}
    for prefix, module in model.named_modules():
        if hasattr(module, "basis_splits"):
            tensors.update({f"{prefix}.{name}": entry for name, entry in module.basis_splits().items()})
    return tensors


@torch.no_grad()
def init_weights(model: torch.nn.Module, cfg: Config) -> None:
    std = cfg.model.init_method_std
    output_std = std / math.sqrt(2.0 * cfg.model.num_layers)  # megatron-core's scaled init
    num_local = routed_experts(cfg) // cfg.parallel.expert
    first_expert = ps.get_expert_model_parallel_rank() * num_local
    source = WeightDirectory(cfg.model.init_from) if cfg.model.init_from else None
    first_rank = not dist.is_initialized() or dist.get_rank() == 0
    # SD-MoE's common matrices are computed from the experts' weights afterwards (sdmoe.prepare)
    params = [(name, param) for name, param in model.named_parameters() if not getattr(param, "derived", False)]
    if source is not None:
        _copy_from(source, model)
        names = [name for name, _ in params]
        if first_rank and any(name not in source for name in names):  # meant (a module added) or not: said
            print(f"model.init_from: drawn fresh, as {cfg.model.init_from} does not hold them: "
                  f"{_fresh_modules(names, source)}", flush=True)
        params = [(name, param) for name, param in params if name not in source]
    draws = []
    for name, param in params:
        if param.dim() == 1:  # norm weights (no biases in these families)
            param.fill_(1.0 if "norm" in name else 0.0)
        else:
            draws += _draws(name, param, first_expert, cfg.train.seed,
                            output_std if any(p in name for p in _OUTPUT_PROJECTIONS) else std)
    # One core draws 65-80M values/s: minutes per rank for the largest configs. Each weight has its
    # own generator, so the draws run on this rank's cores at once (torch releases the GIL) with
    # the same values as one by one; and a bar, shown once it takes over 5 s, on the first rank.
    bar = tqdm(total=sum(target.numel() for target, _ in draws), desc="initial weights", unit="value",
               unit_scale=True, delay=5, disable=not first_rank)
    with ThreadPoolExecutor(cores_per_local_rank()) as pool:
        for target in pool.map(_fill, draws):
            bar.update(target.numel())
    bar.close()


def _fresh_modules(names: list[str], source: WeightDirectory) -> str:
    """The parameters of `names` that `source` lacks, as the largest modules none of whose
    parameters it holds (`mtp`, `decoder.layers.*.mlp.router`: layer numbers as *), each with its
    count of weights: one short line."""
    def prefixes(name: str) -> list[str]:
        parts = name.split(".")
        return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
    held = {prefix for name in names if name in source for prefix in prefixes(name)}
    counts: dict[str, int] = {}
    for name in names:
        if name not in source:
            module = re.sub(r"\.\d+(?=\.|$)", ".*", next(p for p in prefixes(name) if p not in held))
            counts[module] = counts.get(module, 0) + 1
    return ", ".join(f"{module} ({count} weights)" for module, count in counts.items())


@torch.no_grad()  # in the drawing thread: grad mode is per thread
def _fill(job: tuple[torch.Tensor, Callable[[], torch.Tensor]]) -> torch.Tensor:
    target, values = job
    return target.copy_(values())


@torch.no_grad()
def poison_weights(model: torch.nn.Module) -> None:
    """Every weight NaN, for a model whose checkpoint is about to load: drawing it first would cost
    minutes per rank at scale on every restart, and a weight the load missed now fails loudly
    (NaN loss) instead of training on silently from its random draw."""
    for tensor in weight_tensors(model).values():
        tensor.fill_(float("nan"))


def _copy_from(source: WeightDirectory, model: torch.nn.Module) -> None:
    """This rank's parts of every tensor in `source` (parameters, and the routing bias a DeepSeek
    model carries); one the model has no place for is refused, never dropped."""
    targets = {name: (t, split_record(t)) for name, t in weight_tensors(model).items()}
    unknown = [name for name in source.names() if name not in targets]
    if unknown:
        hint = " (a routing bias: set moe.expert_bias_update_rate > 0)" if unknown[0].endswith("expert_bias") else ""
        raise UserError(f"model.init_from: {unknown[0]} has no place in this model{hint}: convert weights of "
                        "this model's architecture")
    for name in source.names():
        target, split = targets[name]
        target.copy_(local_part(name, source.tensor(name), split, target.shape))


def _draws(name: str, param: torch.nn.Parameter, first_expert: int, seed: int,
           std: float) -> list[tuple[torch.Tensor, Callable[[], torch.Tensor]]]:
    """(part of `param`, the draw of its values) for each whole weight `param` holds."""
    is_expert = ".experts." in name
    if getattr(param, "stacked_experts", False):  # [local experts, ...]: one draw per expert
        prefix, projection = name.rsplit(".", 1)
        keys = [f"{prefix}.local_experts.{first_expert + e}.{projection}.weight" for e in range(param.shape[0])]
        return [(param[e], partial(draw, key, param[e], param, 1, is_expert, seed, std)) for e, key in enumerate(keys)]
    key = _LOCAL_EXPERT.sub(lambda m: f".local_experts.{first_expert + int(m.group(1))}.", name)
    return [(param, partial(draw, key, param, param, 0, is_expert, seed, std))]
