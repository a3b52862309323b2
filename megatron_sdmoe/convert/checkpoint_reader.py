"""Whole tensors from a checkpoint saved with any TP / EP / ETP / ZeRO layout, one at a time.

Every model-owner rank file (training/checkpoint.py) holds that rank's shard of each model
tensor, the rank's place in the layout (`position`: TP, EP and expert-TP ranks) and how each
tensor is split (`shards`: TP partition dim and stride, whether it stacks experts). The files are
memory-mapped, so assembling a tensor reads only its shards.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from megatron_sdmoe.config import Config, load_config
from megatron_sdmoe.errors import UserError
from megatron_sdmoe.training.checkpoint import latest_checkpoint


def checkpoint_dir(path: str | Path) -> Path:
    """A step_* directory, or a run directory (its latest checkpoint)."""
    path = latest_checkpoint(Path(path)) or Path(path)
    if not (path / "meta.json").is_file():
        raise UserError(f"{path} is not a complete checkpoint: give a run directory or a checkpoints/step_* "
                        "directory with meta.json")
    return path


def unshard(shards: list[torch.Tensor], dim: int | None, stride: int) -> torch.Tensor:
    """The inverse of megatron-core's TP split (models/init.py: shard) over ranks in order."""
    if dim is None or len(shards) == 1:  # replicated, or not split: no copy
        return shards[0]
    parts = [s.chunk(stride, dim) for s in shards]
    return torch.cat([parts[rank][k] for k in range(stride) for rank in range(len(shards))], dim)


class CheckpointReader:
    def __init__(self, path: str | Path):
        self.dir = checkpoint_dir(path)
        self.meta = json.loads((self.dir / "meta.json").read_text())
        self.config: Config = load_config(self.dir / "config.yaml")
        owners = []
        for file in sorted(self.dir.glob("rank_*.pt")):
            state = torch.load(file, map_location="cpu", mmap=True, weights_only=False)
            if "model" in state:
                owners.append(state)
        if not owners or "shards" not in owners[0]:
            raise UserError(f"{self.dir} was saved before checkpoints recorded how tensors are split: resume the run "
                            "for a step with this version to save a convertible checkpoint")
        self.shards: dict[str, dict] = owners[0]["shards"]
        self.owners = owners

    def names(self) -> list[str]:
        return list(self.shards)

    def tensor(self, name: str) -> torch.Tensor:
        return self._assemble(name, lambda shard: shard)

    def placeholder(self, name: str) -> torch.Tensor:
        """A data-less (meta) tensor of `name`'s whole shape and dtype; reads no shard."""
        return self._assemble(name, lambda shard: shard.to("meta"))

    def _assemble(self, name: str, load) -> torch.Tensor:
        info = self.shards[name]
        if info["experts"]:  # EP ranks hold consecutive experts, each split over expert TP
            by_ep: dict[int, dict[int, torch.Tensor]] = {}
            for owner in self.owners:
                by_ep.setdefault(owner["position"]["ep"], {})[owner["position"]["etp"]] = load(owner["model"][name])
            return torch.cat([unshard([etp[r] for r in sorted(etp)], info["dim"], info["stride"])
                              for _, etp in sorted(by_ep.items())])
        by_tp: dict[int, torch.Tensor] = {}
        for owner in self.owners:
            by_tp.setdefault(owner["position"]["tp"], load(owner["model"][name]))
        return unshard([by_tp[r] for r in sorted(by_tp)], info["dim"], info["stride"])
