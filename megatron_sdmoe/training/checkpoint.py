"""Checkpoints that resume exactly: model, ZeRO optimizer partitions, LR schedule, RNG, step.

Layout on disk (`run_dir/checkpoints/`):
    step_00000008/meta.json         step, layout, each rank's place in it, consumed samples, the
                                    training loop's own state (written last, by rank 0)
    step_00000008/config.yaml       the run's config when it saved (resuming checks the model against it)
    step_00000008/rank_00003.pt     this rank's ZeRO optimizer partition, schedule, RNG; and, if
                                    the rank is the first with its TP / EP / expert-TP position, its
                                    model shard, the position and how each tensor is split (so every
                                    shard is stored once, and convert/ can reassemble whole tensors)
    latest                          name of the newest complete checkpoint

DeepSpeed's own save_checkpoint is not used: with megatron-core experts (not DeepSpeed MoE
layers) it drops every parameter whose name contains "expert" from the model file. A checkpoint
is written to a temporary directory and renamed into place, then `latest` is moved; a crash
mid-save leaves the previous checkpoint as `latest`, and a write that fails on any rank (a full
disk, a quota) is every rank's one-line error, the partial checkpoint removed.

A checkpoint resumes in another layout: at another data-parallel size reshard.py re-cuts the ZeRO
partitions; at another TP / EP / expert-TP it re-cuts every tensor and its optimizer state.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import random
import shutil
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

from megatron_sdmoe.errors import UserError
from megatron_sdmoe.models.init import split_tensors
from megatron_sdmoe.runtime import Layout
from megatron_sdmoe.runtime.agreement import agreed
from megatron_sdmoe.training.reshard import SavedRanks, load_resharded_optimizer, relaid_model_state
from megatron_sdmoe.training.schedule import resume_schedule

LATEST = "latest"


def checkpoint_root(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The step_* directory `latest` names in a run directory; without `latest` (a crash between a
    first save's rename and `latest`, or a `latest` deleted) the newest complete one, so that it is
    resumed, not overwritten; None before the first save."""
    root = checkpoint_root(run_dir)
    if (root / LATEST).exists():
        return root / (root / LATEST).read_text().strip()
    complete = complete_checkpoints(run_dir)
    return complete[-1] if complete else None


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """The run's complete step_* directories (meta.json is written last), by step (zero-padded names)."""
    return sorted(p for p in checkpoint_root(run_dir).glob("step_*") if (p / "meta.json").exists())


def _position() -> dict[str, int]:
    """This rank's place in the model's layout: its model shard is the same on every rank with the
    same TP, EP and expert-TP ranks (they differ only in data)."""
    return {"tp": ps.get_tensor_model_parallel_rank(), "ep": ps.get_expert_model_parallel_rank(),
            "etp": ps.get_expert_tensor_parallel_rank()}


def _places() -> list[dict[str, int]]:
    """Every rank's position and data-parallel ranks (`dp` for dense, `edp` for expert parameters: the
    order of its ZeRO partitions), by rank (a collective)."""
    places = [None] * dist.get_world_size()
    dist.all_gather_object(places, {**_position(), "dp": ps.get_data_parallel_rank(),
                                    "edp": ps.get_expert_data_parallel_rank()})
    return places


def owner_rank(places: list[dict[str, int]], position: dict[str, int]) -> int:
    """The rank whose file holds the model shard of `position`: the first rank there."""
    return next(rank for rank, place in enumerate(places) if all(place[k] == v for k, v in position.items()))


def model_shards(model: torch.nn.Module) -> dict[str, dict]:
    """How each tensor a layout splits is split over ranks (models/init.py: split_record);
    convert/checkpoint_reader.py and reshard.py reassemble them."""
    return {name: split for name, (_, split) in split_tensors(model).items()}


MODEL_PARALLEL = ("tensor", "expert", "expert_tensor")  # a change re-cuts every tensor (reshard.py)


def layout_meta(world_size: int, tensor: int, expert: int, expert_tensor: int) -> dict:
    return {"world_size": world_size, "tensor": tensor, "expert": expert, "expert_tensor": expert_tensor}


def _layout_of(layout: Layout) -> dict:
    return layout_meta(layout.world_size, layout.tensor, layout.expert, layout.expert_tensor)


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


def save_checkpoint(run_dir: Path, step: int, engine, layout: Layout, consumed_samples: int, keep: int,
                    trainer_state: dict) -> Path:
    """Write step `step` atomically, point `latest` at it, then keep only the newest `keep` (0: all).
    `trainer_state`: the training loop's own state, the same on every rank (saved_trainer_state)."""
    root = checkpoint_root(run_dir)
    name = f"step_{step:08d}"
    final, tmp = root / name, root / f".tmp_{name}"
    main = layout.is_main
    # Each phase runs under `agreed`, whose collective is the phase's barrier: a write that fails
    # on one rank (a full disk, a quota) is every rank's one-line error, and `latest` keeps the
    # last complete checkpoint.
    try:
        agreed(lambda: _checked(final, run_dir, lambda: _fresh(tmp) if main else None))
        state = {"optimizer": engine.optimizer.state_dict(), "scheduler": engine.lr_scheduler.state_dict(),
                 "rng": _rng_state()}
        places = _places()
        if owner_rank(places, _position()) == layout.rank:
            state.update(model=engine.module.state_dict(), shards=model_shards(engine.module), position=_position())
        agreed(lambda: _checked(final, run_dir, lambda: _save_synced(state, tmp / f"rank_{layout.rank:05d}.pt")))
        meta = {"step": step, "consumed_samples": consumed_samples, "vocab_rows": engine.module.vocab_size,
                "layout": _layout_of(layout),
                "ranks": places, "trainer": trainer_state}
        agreed(lambda: _checked(final, run_dir, lambda: _complete(run_dir, tmp, final, meta, keep) if main else None))
    except UserError:
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _fresh(directory: Path) -> None:
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)


def _checked(final: Path, run_dir: Path, write):
    """`write()`, its OSError as the one-line error: the checkpoint, the reason, what is kept."""
    try:
        return write()
    except OSError as e:
        previous = latest_checkpoint(run_dir)
        kept = f"checkpoints/latest still names {previous.name}" if previous else "no earlier checkpoint exists"
        raise UserError(f"writing checkpoint {final} failed ({e.strerror or e}): free space or quota under "
                        f"{final.parent}, then start again in the same run.dir to resume ({kept})") from e


def _complete(run_dir: Path, tmp: Path, final: Path, meta: dict, keep: int) -> None:
    """Rank 0, once every rank's file is written: the config and meta.json, the rename, `latest`,
    then retention."""
    root = final.parent
    _write_synced(tmp / "config.yaml", (run_dir / "config.yaml").read_text())
    _write_synced(tmp / "meta.json", json.dumps(meta, indent=1))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    point_latest(root, final.name)
    if keep:  # the newest `keep` up to this one; later steps (a rolled-back run's, kept by hand) stay
        older = sorted(p for p in root.glob("step_*") if p.name < final.name)  # zero-padded names sort by step
        for old in older[:max(0, len(older) - (keep - 1))]:
            shutil.rmtree(old)


def point_latest(root: Path, name: str) -> None:
    """Make `latest` name the checkpoint directory `name`, atomically."""
    _write_synced(root / f".{LATEST}.tmp", name)
    os.replace(root / f".{LATEST}.tmp", root / LATEST)


def read_meta(path: Path) -> dict:
    """A checkpoint's meta.json (step, layout, ...), refused when damaged (a copy cut short)."""
    try:
        meta = json.loads((path / "meta.json").read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"checkpoint {path}: meta.json is damaged ({str(e).splitlines()[0]}): copy the checkpoint "
                        "again, or sdmoe-checkpoints rollback to an earlier one") from None
    if not isinstance(meta, dict) or not {"step", "layout"} <= set(meta):
        raise UserError(f"checkpoint {path}: meta.json lacks the step and layout: copy the checkpoint again, or "
                        "sdmoe-checkpoints rollback to an earlier one")
    return meta


def check_intact(path: Path, contents: bool = True) -> None:
    """Refuse a checkpoint with a rank file missing, cut short (a copy that stopped, a disk that
    filled while copying) or with damaged contents, which would otherwise fail on one rank while the
    others wait, or load silently (torch.load checks no checksum). Under torch.distributed each rank
    checks its share of the files, else this process all of them. `contents`: every member of the
    zip archive torch.save writes is read against its CRC-32 (one read pass); else only the
    archive's directory, at its end."""
    saved = read_meta(path)["layout"]["world_size"]
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    for index in range(rank, saved, world):
        file = path / f"rank_{index:05d}.pt"
        try:
            with zipfile.ZipFile(file) as archive:
                failed = archive.testzip() if contents else None  # the first member whose CRC-32 fails
            problem = failed and f"{failed} fails its checksum"
        except (OSError, zipfile.BadZipFile) as e:
            problem = getattr(e, "strerror", None) or str(e)
        if problem:
            raise UserError(f"checkpoint {path}: {file.name} is {'damaged' if file.exists() else 'missing'} "
                            f"({problem}): copy the checkpoint again, or resume from an earlier one "
                            f"(sdmoe-checkpoints list / rollback {path.parent.parent})")


def relaid_from(path: Path | None, layout: Layout) -> str | None:
    """The layout a checkpoint was saved in, in words, if this run's differs (None: the same layout,
    or no checkpoint)."""
    saved = read_meta(path)["layout"] if path is not None else None
    if saved is None or saved == _layout_of(layout):
        return None
    return layout_words(saved)


def layout_words(saved: dict) -> str:
    """A checkpoint's layout (its meta.json's) in words."""
    return f"world {saved['world_size']}, TP {saved['tensor']}, EP {saved['expert']}, ETP {saved['expert_tensor']}"


def saved_step(path: Path | None) -> int:
    """The step of a checkpoint (0 for none: before the first)."""
    return read_meta(path)["step"] if path is not None else 0


def saved_trainer_state(path: Path | None) -> dict:
    """The training loop's state saved with a checkpoint ({} for none: before the first)."""
    return read_meta(path).get("trainer", {}) if path is not None else {}


def load_checkpoint(path: Path | None, engine, layout: Layout, model_only: bool = False) -> int:
    """Restore the checkpoint at `path`, if any (check_resumable has vetted it); returns the step to
    start from. `model_only` (evaluation): the weights, not the optimizer or schedule."""
    if path is None:
        return 0
    meta = read_meta(path)
    places = _places()
    saved = SavedRanks(path, meta.get("ranks", places))  # without "ranks": saved in this very layout
    # this run's optimizer settings (weight decay, betas, eps): loading the saved state overwrites them
    settings = [{k: v for k, v in group.items() if k != "params"} for group in engine.optimizer.param_groups]
    current = _layout_of(layout)
    relaid = any(meta["layout"][key] != current[key] for key in MODEL_PARALLEL)
    same_ranks = meta["layout"] == current
    if relaid:
        engine.module.load_state_dict(relaid_model_state(engine.module, saved), strict=True)
        own = saved.file(0)  # for the schedule, the same on every rank
    else:  # the model shard of this rank's position: the same as before (data-parallel size aside)
        owner = owner_rank(saved.places, _position())
        own = saved.file(layout.rank if same_ranks else owner)
        engine.module.load_state_dict(own["model"] if "model" in own else saved.file(owner)["model"], strict=True)
    if model_only:
        return meta["step"]
    if same_ranks:
        # ZeRO takes the list of every data-parallel rank's state and picks its own by DP rank.
        partitions = [None] * layout.data_parallel
        partitions[layout.data_parallel_rank] = own["optimizer"]
        with contextlib.redirect_stdout(io.StringIO()):  # BF16_Optimizer prints a line as it loads
            engine.optimizer.load_state_dict(partitions, load_optimizer_states=True, load_from_fp32_weights=True)
    else:
        load_resharded_optimizer(engine.optimizer, saved, places[layout.rank], relaid)
    for group, own_settings in zip(engine.optimizer.param_groups, settings):
        group.update(own_settings)
    resume_schedule(engine.lr_scheduler, own["scheduler"])
    if not relaid:
        # At another layout the saved per-rank RNG streams have no counterparts; nothing draws from
        # them while training (dropout is off), so this run's seeded streams stand.
        _set_rng_state(own["rng"])
    return meta["step"]


class _KeptErrors:
    """A file whose write errors are kept: torch.save reports a failed write (a full disk, a quota)
    only as a RuntimeError from its zip writer, without the OS's reason."""

    def __init__(self, file):
        self.file, self.error = file, None

    def write(self, data) -> int:
        try:
            return self.file.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.file.flush()


def _save_synced(obj, path: Path) -> None:
    with open(path, "wb") as f:
        writer = _KeptErrors(f)
        try:
            torch.save(obj, writer)
        except RuntimeError:
            if writer.error is None:
                raise
            raise writer.error from None
        f.flush()
        os.fsync(f.fileno())


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
