"""Whole tensors from a checkpoint saved with any TP / EP / ETP / ZeRO layout, one at a time.

Every model-owner rank file (training/checkpoint.py) holds that rank's shard of each model
tensor, the rank's place in the layout (`position`: TP, EP and expert-TP ranks) and how each
tensor is split (`shards`: models/init.py's split records); training/reshard.py assembles them.
The files are memory-mapped, so assembling a tensor reads only its shards.
"""
from __future__ import annotations

from pathlib import Path

import torch

from megatron_sdmoe.config import Config, load_config
from megatron_sdmoe.errors import UserError
from megatron_sdmoe.training.checkpoint import check_intact, latest_checkpoint, read_meta
from megatron_sdmoe.training.reshard import assemble


def checkpoint_dir(path: str | Path) -> Path:
    """A step_* directory, or a run directory (its latest checkpoint)."""
    path = latest_checkpoint(Path(path)) or Path(path)
    if not (path / "meta.json").is_file():
        what = "is not a complete checkpoint" if path.exists() else "does not exist"
        raise UserError(f"{path} {what}: give a run directory or a checkpoints/step_* directory with meta.json")
    return path


class CheckpointReader:
    def __init__(self, path: str | Path):
        self.dir = checkpoint_dir(path)
        self.meta = read_meta(self.dir)
        self.config: Config = load_config(self.dir / "config.yaml")
        if self.config.moe.expert_impl == "sequential":  # per-expert weights named by local index
            raise UserError(f"{self.dir} holds megatron-core's sequential experts (moe.expert_impl=sequential), "
                            "which conversion does not read: convert a run with moe.expert_impl=grouped (the "
                            "default, the same model)")
        check_intact(self.dir)
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
        """The weights (the split records also cover SD-MoE's bases, which conversion does not read)."""
        return [name for name, split in self.shards.items() if split.get("weight", True)]

    def tensor(self, name: str) -> torch.Tensor:
        return assemble(self.owners, name, lambda owner: owner["model"][name])

    def placeholder(self, name: str) -> torch.Tensor:
        """A data-less (meta) tensor of `name`'s whole shape and dtype; reads no shard."""
        return assemble(self.owners, name, lambda owner: owner["model"][name].to("meta"))
