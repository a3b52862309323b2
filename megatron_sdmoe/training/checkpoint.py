"""Checkpoints that resume exactly: model, ZeRO optimizer partitions, LR schedule, RNG, step.

Layout on disk (`run_dir/checkpoints/`):
    step_00000008/meta.json         step, layout, consumed samples (written last, by rank 0)
    step_00000008/rank_00003.pt     this rank's ZeRO optimizer partition, schedule, RNG; and the
                                    model shard if the rank is first in its expert-data-parallel
                                    group (every model shard is stored once per TP/EP/ETP position)
    latest                          name of the newest complete checkpoint

DeepSpeed's own save_checkpoint is not used: with megatron-core experts (not DeepSpeed MoE
layers) it drops every parameter whose name contains "expert" from the model file. A checkpoint
is written to a temporary directory and renamed into place, then `latest` is moved; a crash
mid-save leaves the previous checkpoint as `latest`.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

from megatron_sdmoe.errors import UserError
from megatron_sdmoe.runtime import Layout

LATEST = "latest"


def checkpoint_root(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def _model_owner_rank() -> int:
    """The rank whose file holds this rank's model shard: first of its expert-data-parallel group."""
    return dist.get_process_group_ranks(ps.get_expert_data_parallel_group())[0]


def _layout_meta(layout: Layout) -> dict:
    return {"world_size": layout.world_size, "tensor": layout.tensor, "expert": layout.expert,
            "expert_tensor": layout.expert_tensor}


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
             "tracker": get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    get_cuda_rng_tracker().set_states(state["tracker"])
    if torch.cuda.is_available() and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(run_dir: Path, step: int, engine, layout: Layout, consumed_samples: int, keep: int = 0) -> Path:
    """Write step `step` atomically, point `latest` at it, then keep only the newest `keep` (0: all)."""
    root = checkpoint_root(run_dir)
    name = f"step_{step:08d}"
    final, tmp = root / name, root / f".tmp_{name}"
    if layout.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    state = {"optimizer": engine.optimizer.state_dict(), "scheduler": engine.lr_scheduler.state_dict(),
             "rng": _rng_state()}
    if _model_owner_rank() == layout.rank:
        state["model"] = engine.module.state_dict()
    _save_synced(state, tmp / f"rank_{layout.rank:05d}.pt")
    dist.barrier()
    if layout.is_main:
        meta = {"step": step, "consumed_samples": consumed_samples, "layout": _layout_meta(layout)}
        _write_synced(tmp / "meta.json", json.dumps(meta, indent=1))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _write_synced(root / f".{LATEST}.tmp", name)
        os.replace(root / f".{LATEST}.tmp", root / LATEST)
        if keep:
            for old in sorted(root.glob("step_*"))[:-keep]:  # zero-padded names sort by step
                shutil.rmtree(old)
    dist.barrier()
    return final


def load_latest(run_dir: Path, engine, layout: Layout) -> int:
    """Restore the newest checkpoint in `run_dir`, if any; returns the step to start from."""
    root = checkpoint_root(run_dir)
    if not (root / LATEST).exists():
        return 0
    path = root / (root / LATEST).read_text().strip()
    meta_path = path / "meta.json"
    if not meta_path.exists():
        raise UserError(f"checkpoint {path} named by {root / LATEST} is missing or incomplete: point "
                        f"{root / LATEST} at a complete step_* directory or start a new run.dir")
    meta = json.loads(meta_path.read_text())
    if meta["layout"] != _layout_meta(layout):
        raise UserError(f"checkpoint {path} was saved with layout {meta['layout']} but this run has "
                        f"{_layout_meta(layout)}: resume with the same world size and parallel.* settings")
    own = torch.load(path / f"rank_{layout.rank:05d}.pt", map_location="cpu", weights_only=False)
    owner = _model_owner_rank()
    model_state = own["model"] if owner == layout.rank else torch.load(
        path / f"rank_{owner:05d}.pt", map_location="cpu", weights_only=False)["model"]
    engine.module.load_state_dict(model_state, strict=True)
    # ZeRO takes the list of every data-parallel rank's state and picks its own by DP rank.
    partitions = [None] * layout.data_parallel
    partitions[layout.data_parallel_rank] = own["optimizer"]
    engine.optimizer.load_state_dict(partitions, load_optimizer_states=True, load_from_fp32_weights=True)
    engine.lr_scheduler.load_state_dict(own["scheduler"])
    _set_rng_state(own["rng"])
    return meta["step"]


def _save_synced(obj, path: Path) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
