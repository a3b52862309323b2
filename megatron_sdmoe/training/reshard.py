"""Resume at another layout: a checkpoint's model shards and ZeRO partitions re-cut for this run.

Each rank file of a checkpoint holds that rank's ZeRO-1/2 partition: a flat slice of its
data-parallel group's fp32 master weights and Adam moments per parameter group, and DeepSpeed's map
of which parameter fragment lies where in it (`param_slice_mappings`). The first rank of each TP /
EP / expert-TP position also holds the position's model shard and how each tensor is split.

- Another data-parallel size (the same TP / EP / expert-TP): a parameter is the same tensor as
  before on the ranks of its position; its state is its fragments from the old group's partitions,
  joined in data-parallel order, and this rank keeps the fragment its new partition holds.
- Another TP / EP / expert-TP: each tensor (weight, fp32 master, Adam moments, SD-MoE basis) is
  assembled whole from the old positions' shards, as conversion does, and this rank keeps its part
  of it, as `model.init_from` does (models/init.py: local_part).

Joining fragments is what DeepSpeed's universal-checkpoint loader does
(deepspeed/checkpoint/universal_checkpoint.py); it is written out here because that loader reads
whole tensors from DeepSpeed's own checkpoint tree, which these checkpoints do not use
(checkpoint.py says why).
"""
from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from deepspeed.checkpoint.constants import BASE_OPTIMIZER_STATE, PARAM_SLICE_MAPPINGS, SINGLE_PARTITION_OF_FP32_GROUPS
from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
from deepspeed.utils.tensor_fragment import map_to_flat_opt_states
from tqdm import tqdm

from megatron_sdmoe.models.init import local_part, split_record, split_tensors, tp_size_and_rank

MOMENTS = ("exp_avg", "exp_avg_sq")  # AdamW's per-element state; "step" is one count per group
STATE = ("fp32", *MOMENTS)


def unshard(shards: list[torch.Tensor], dim: int | None, stride: int) -> torch.Tensor:
    """The inverse of megatron-core's TP split (models/init.py: shard) over ranks in order."""
    if dim is None or len(shards) == 1:  # replicated, or not split: no copy
        return shards[0]
    parts = [s.chunk(stride, dim) for s in shards]
    return torch.cat([parts[rank][k] for k in range(stride) for rank in range(len(shards))], dim)


def assemble(owners: list[dict], name: str, piece: Callable[[dict], torch.Tensor],
             entries: slice | None = None) -> torch.Tensor:
    """Tensor `name` whole, from the model-owner rank files `owners` (`piece(owner)`: that owner's
    shard of it). A tensor stacked over EP (experts, SD-MoE bases) is joined by global index along
    dim 0, each index once (a basis of a group spanning EP ranks is on each of them); `entries`:
    only those indices (reads no other EP rank's shard)."""
    info = owners[0]["shards"][name]
    if not info["experts"]:
        by_tp: dict[int, dict] = {}
        for owner in owners:
            by_tp.setdefault(owner["position"]["tp"], owner)
        return unshard([piece(by_tp[r]) for r in sorted(by_tp)], info["dim"], info["stride"])
    by_ep: dict[int, dict[int, dict]] = {}  # EP rank -> expert-TP rank -> owner
    for owner in owners:
        by_ep.setdefault(owner["position"]["ep"], {})[owner["position"]["etp"]] = owner
    parts, taken = [], set()
    for _, by_etp in sorted(by_ep.items()):
        owner = next(iter(by_etp.values()))
        count = owner["model"][name].shape[0]
        # "first" is recorded since checkpoints hold bases; before, only experts stacked: EP rank x count
        first = owner["shards"][name].get("first", owner["position"]["ep"] * count)
        held = range(first, first + count)
        wanted = [i for i in held if i not in taken and (entries is None or entries.start <= i < entries.stop)]
        if wanted:
            rows = slice(wanted[0] - first, wanted[-1] - first + 1)
            parts.append(unshard([piece(by_etp[r])[rows] for r in sorted(by_etp)], info["dim"], info["stride"]))
            taken.update(wanted)
    return torch.cat(parts)


class SavedRanks:
    """A checkpoint's rank files (memory-mapped, loaded on first use: reading a shard or fragment
    reads only it) and each rank's place in its layout (checkpoint.py: _places)."""

    def __init__(self, path: Path, places: list[dict]):
        self.path, self.places, self._files, self._groups = path, places, {}, {}

    def file(self, rank: int) -> dict:
        if rank not in self._files:
            self._files[rank] = torch.load(self.path / f"rank_{rank:05d}.pt", map_location="cpu", weights_only=False,
                                           mmap=True)
        return self._files[rank]

    def owners(self) -> list[dict]:
        """The files holding a model shard: the first rank of each position."""
        positions = {(p["tp"], p["ep"], p["etp"]): rank for rank, p in reversed(list(enumerate(self.places)))}
        return [self.file(rank) for rank in sorted(positions.values())]

    def partitions(self, position: dict, expert: bool) -> list[dict]:
        """The optimizer states of the ranks whose ZeRO partitions hold the dense or expert parameters
        of `position`, in data-parallel order (found once per group: asked for every parameter)."""
        keys, order = (("ep", "etp"), "edp") if expert else (("tp",), "dp")
        group = tuple(position[k] for k in keys), expert
        if group not in self._groups:
            ranks = sorted((r for r, p in enumerate(self.places) if all(p[k] == position[k] for k in keys)),
                           key=lambda r: self.places[r][order])
            self._groups[group] = [self.file(rank)["optimizer"] for rank in ranks]
        return self._groups[group]

    def zero_state(self, name: str, numel: int, position: dict, expert: bool) -> dict[str, torch.Tensor]:
        """fp32 master weight and Adam moments of `position`'s shard of parameter `name`, flat,
        joined from its fragments in the saved partitions."""
        pieces: dict[str, list[torch.Tensor]] = {key: [] for key in STATE}
        for state in self.partitions(position, expert):
            for group, mapping in enumerate(state[PARAM_SLICE_MAPPINGS]):
                if name in mapping:
                    start, count = mapping[name].start, mapping[name].numel
                    pieces["fp32"].append(state[SINGLE_PARTITION_OF_FP32_GROUPS][group].narrow(0, start, count))
                    moments = state[BASE_OPTIMIZER_STATE]["state"][group]
                    for key in MOMENTS:
                        pieces[key].append(moments[key].narrow(0, start, count))
        whole = {key: torch.cat(parts) for key, parts in pieces.items() if parts}
        if any(t.numel() != numel for t in whole.values()) or len(whole) != len(pieces):
            raise RuntimeError(f"checkpoint: the saved partitions hold {whole['fp32'].numel() if whole else 0} of "
                               f"{name}'s {numel} elements")
        return whole


def stacked_entries(split: dict, shape: torch.Size) -> slice | None:
    """The global indices a tensor stacked over EP holds on this rank (None: not stacked)."""
    return slice(split["first"], split["first"] + shape[0]) if split["experts"] else None


def this_ranks_part(name: str, split: dict, shape: torch.Size, owners: list[dict],
                    piece: Callable[[dict], torch.Tensor]) -> torch.Tensor:
    """This rank's part of `name` (split as `split`, of shape `shape` here) from another layout's
    owners (`piece(owner)`: that owner's shard): joined whole (only this rank's experts, and only its
    TP shard where the TP size stayed), then cut."""
    entries = stacked_entries(split, shape)
    size, rank = tp_size_and_rank(".experts." in name)  # the TP group local_part cuts over
    key = "etp" if split["experts"] else "tp"  # the TP rank assemble joins by
    if split["dim"] is not None and len({owner["position"][key] for owner in owners}) == size:
        # cut as it was saved: this rank's shard is its TP rank's own, read alone
        owners, split = [owner for owner in owners if owner["position"][key] == rank], {**split, "dim": None}
    whole = assemble(owners, name, piece, entries)
    return local_part(name, whole, split, shape, offset=entries.start if entries else 0)


def relaid_model_state(model: torch.nn.Module, saved: SavedRanks) -> dict[str, torch.Tensor]:
    """This rank's state dict of `model`, from a checkpoint saved with another TP / EP / ETP layout."""
    owners = saved.owners()
    state = dict(owners[0]["model"])  # what no layout splits (megatron-core's empty _extra_state), as saved
    for name, (tensor, split) in _progress(split_tensors(model).items(), "re-cutting weights"):
        state[name] = this_ranks_part(name, split, tensor.shape, owners, lambda owner: owner["model"][name])
    return state


def load_resharded_optimizer(optimizer, saved: SavedRanks, place: dict, relaid: bool) -> None:
    """Fill the ZeRO optimizer `optimizer` (DeepSpeed's stage 1/2 optimizer, or the BF16_Optimizer of
    bf16 ZeRO-1, before its first step) of the rank at `place` from a checkpoint saved with other
    data-parallel sizes, or (`relaid`) another TP / EP / ETP layout."""
    owners = saved.owners() if relaid else []
    # Every group counts the same steps, and another layout may group the parameters otherwise (EP 1
    # has no expert group): the count of any saved group serves.
    step = saved.file(0)["optimizer"][BASE_OPTIMIZER_STATE]["state"][0]["step"]
    bit16_groups = optimizer.bf16_groups if isinstance(optimizer, BF16_Optimizer) else optimizer.bit16_groups
    for group, params in zip(optimizer.optimizer.param_groups, bit16_groups):
        expert = bool(group.get("moe"))
        for param in _progress(params, "re-cutting optimizer state") if relaid else params:
            if param._hp_mapping is None:  # no fragment of it in this rank's partition
                continue
            name = optimizer.param_names[param]
            whole = (_relaid_state(name, param, owners, saved) if relaid
                     else saved.zero_state(name, param.numel(), place, expert))
            start, numel = param._hp_mapping.lp_fragment_address.start, param._hp_mapping.lp_fragment_address.numel
            param._hp_mapping.hp_fragment.data.copy_(whole["fp32"].narrow(0, start, numel))
            param._hp_mapping.optim_fragment = {key: whole[key].narrow(0, start, numel) for key in MOMENTS}
        flat = group["params"][0]
        # DeepSpeed's own step of its universal loader: the fragments into one flat state tensor per group
        map_to_flat_opt_states(flat, params, optimizer.optimizer.state, MOMENTS)
        optimizer.optimizer.state[flat]["step"] = copy.deepcopy(step)  # torch's AdamW counts in place


def _relaid_state(name: str, param: torch.Tensor, owners: list[dict], saved: SavedRanks) -> dict[str, torch.Tensor]:
    """This rank's shard of `name`'s master weight and moments, flat, from another layout's partitions.
    An expert's state lies in its expert-data-parallel group's partitions, a dense weight's in its
    data-parallel group's (with EP 1 and expert TP = TP the two are the same ranks)."""
    split, expert = split_record(param), owners[0]["shards"][name]["experts"]
    states: dict[int, dict[str, torch.Tensor]] = {}  # per owner: its position's shard, read once

    def shard_of(owner: dict, key: str) -> torch.Tensor:
        if id(owner) not in states:
            shape = owner["model"][name].shape
            states[id(owner)] = {k: t.view(shape) for k, t in
                                 saved.zero_state(name, shape.numel(), owner["position"], expert).items()}
        return states[id(owner)][key]

    return {key: this_ranks_part(name, split, param.shape, owners, lambda owner: shard_of(owner, key)).reshape(-1)
            for key in STATE}


def _progress(items, description: str):
    """A bar on the first rank, once re-cutting takes over 5 s (every tensor is read whole)."""
    return tqdm(items, desc=description, unit="tensor", delay=5, disable=dist.get_rank() != 0)
