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
import yaml
from megatron.core import parallel_state as ps
from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

from megatron_sdmoe.config import Config, TrainConfig, is_headwise, is_sdmoe, resolved_blend, to_dict
from megatron_sdmoe.errors import UserError
from megatron_sdmoe.models.init import split_tensors
from megatron_sdmoe.runtime import Layout
from megatron_sdmoe.runtime.agreement import agreed
from megatron_sdmoe.training.reshard import SavedRanks, load_resharded_optimizer, relaid_model_state
from megatron_sdmoe.training.schedule import resume_schedule

LATEST = "latest"
# Model settings a resumed run may change: they steer training, not what the saved weights mean.
# Every other model.*, moe.* (and, when the variant uses them, sdmoe.* and headwise.*) key must match.
RESUMABLE_CHANGES = {"model.init_method_std", "model.init_from", "model.mtp_loss_coeff", "moe.aux_loss_coeff", "moe.aux_loss_type",
                     "moe.z_loss_coeff", "moe.capacity_factor", "moe.token_drop_policy", "moe.router_dtype",
                     "moe.diag_interval", "moe.diag_rank", "moe.diag_position_buckets", "sdmoe.refresh_interval",
                     "sdmoe.common_lr_scale", "sdmoe.project_updates", "sdmoe.power_iterations", "sdmoe.oversample"}

# Training settings a resumed run keeps: a step's samples follow from the batches before it.
BATCH_SETTINGS = ("global_batch_size", "batch_size_schedule")
# Settings that draw the samples in another order (the shuffle's seed, the samples' cut): a resumed
# run may change them, and is told that it may then repeat or skip samples of the run so far.
ORDER_SETTINGS = ("train.seed", "data.seq_length", "data.split")


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


def _layout_meta(world_size: int, tensor: int, expert: int, expert_tensor: int) -> dict:
    return {"world_size": world_size, "tensor": tensor, "expert": expert, "expert_tensor": expert_tensor}


def _layout_of(layout: Layout) -> dict:
    return _layout_meta(layout.world_size, layout.tensor, layout.expert, layout.expert_tensor)


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


def check_resumable(cfg: Config, world_size: int, path: Path | None) -> None:
    """Refuse, before anything is written, a checkpoint (`path`: run.dir's latest, or None) that this
    run cannot load: one that `latest` names but is incomplete, one with a rank file missing or cut
    short, one saved in another layout by a version that did not record what re-cutting it needs,
    or one saved by another model."""
    if path is None:
        return
    if not (path / "meta.json").exists():
        raise UserError(f"checkpoint {path} named by {path.parent / LATEST} is missing or incomplete: point "
                        f"{path.parent / LATEST} at a complete step_* directory or start a new run.dir")
    check_intact(path)
    saved_config = _saved_config(path)  # None: written before checkpoints kept it, nothing to compare
    sections = ["model", "moe"] + ["sdmoe"] * is_sdmoe(cfg) + ["headwise"] * is_headwise(cfg)
    differing = _differences(saved_config, cfg, sections, allowed=RESUMABLE_CHANGES) if saved_config else []
    if differing:
        raise UserError(f"checkpoint {path} was saved by another model ({', '.join(differing)}): resume with "
                        "the checkpoint's settings or start a new run.dir")
    if saved_config:
        for key in BATCH_SETTINGS:
            saved_value, value = saved_config["train"].get(key, getattr(TrainConfig(), key)), getattr(cfg.train, key)
            if saved_value != value:
                raise UserError(f"checkpoint {path} was trained with train.{key}={saved_value}, not {value}: the "
                                "data position counts global batches, so other batches would skip or repeat "
                                f"samples; resume with train.{key}={saved_value}")
    meta = read_meta(path)
    saved, par = meta["layout"], cfg.parallel
    wanted = _layout_meta(world_size, par.tensor, par.expert, par.expert_tensor)
    if saved != wanted and "ranks" not in meta:
        raise UserError(f"checkpoint {path} was saved by an older version with layout {saved}, without the ranks' "
                        f"places that resuming with layout {wanted} needs: resume with its layout")
    if any(saved[key] != wanted[key] for key in MODEL_PARALLEL):
        _check_relayable(path, saved, wanted, cfg)


def _check_relayable(path: Path, saved: dict, wanted: dict, cfg: Config) -> None:
    """Refuse a TP / EP / expert-TP change that reshard.py cannot make exactly."""
    again = f"resume with parallel.tensor={saved['tensor']}, parallel.expert={saved['expert']} and " \
            f"parallel.expert_tensor={saved['expert_tensor']}"
    if cfg.moe.expert_impl == "sequential" and max(saved["expert"], wanted["expert"]) > 1:
        raise UserError(f"checkpoint {path}: megatron-core's sequential experts name their weights by local index, "
                        f"so they cannot move between EP ranks: {again}")
    shards = torch.load(path / "rank_00000.pt", map_location="cpu", mmap=True, weights_only=False).get("shards", {})
    if "first" not in next(iter(shards.values()), {}):
        raise UserError(f"checkpoint {path} was saved by an older version, without the split records that resuming "
                        f"at another model-parallel layout needs: {again}")


def _saved_config(checkpoint: Path) -> dict | None:
    """The run's config as the checkpoint saved it (None for checkpoints written without it)."""
    path = checkpoint / "config.yaml"
    return yaml.safe_load(path.read_text()) if path.exists() else None


def _differences(saved: dict, cfg: Config, sections: list[str], allowed=()) -> list[str]:
    """`section.key: saved -> current` for each key of `sections` that differs, those in `allowed` left out."""
    current = to_dict(cfg)
    return [f"{section}.{key}: {old} -> {new}" for section in sections
            for key, old, new in _flat_items(saved.get(section, {}), current[section])
            if old != new and f"{section}.{key}" not in allowed]


def changed_settings(path: Path | None, cfg: Config) -> list[str]:
    """`train.key: saved -> current` (and `smoothing.key`, `data.key`) for each setting this run changes
    against the checkpoint it starts from: they take effect from the resumed step on (the LR schedule
    included; other data continues at the same sample index)."""
    saved = _saved_config(path) if path is not None else None
    return _differences(saved, cfg, ["train", "smoothing", "data"]) if saved is not None else []


def check_finished_stages(path: Path | None, cfg: Config) -> None:
    """Refuse a start that changes the data of a stage the run finished before checkpoint `path`:
    the stage matrix holds each finished stage's validation loss on that data, so rows measured on
    other data would read as forgetting."""
    saved = _saved_config(path) if path is not None else None
    if not saved or not cfg.data.stages:
        return
    step, end = saved_step(path), 0
    for index, (old, new) in enumerate(zip(saved["data"].get("stages", []), cfg.data.stages)):
        end += old["steps"]
        if end > step:
            return
        before = [resolved_blend(old.get(key, [])) for key in ("path", "valid_path")]  # (older runs: relative)
        if before != [new.path, new.valid_path]:
            raise UserError(f"data.stages[{index}] ended at step {end} (the checkpoint is at step {step}), and the "
                            "stage matrix holds losses on its data: keep its path and valid_path as the run had them "
                            f"({before[0]}, {before[1]}), or start a new run.dir")


def _flat_items(saved: dict, current: dict, prefix: str = ""):
    """(dotted key, saved value, current value) for the keys both configs have (nested sections flattened)."""
    for key in saved.keys() & current.keys():
        if isinstance(current[key], dict):
            yield from _flat_items(saved[key], current[key], f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", saved[key], current[key]


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


def check_vocabulary(path: Path | None, rows: int) -> None:
    """Refuse, before anything is written, resuming a checkpoint whose embedding has another number
    of rows than this run's model (`rows`, padded): another tokenizer, or another model.vocab_size."""
    if path is None:
        return
    saved = read_meta(path).get("vocab_rows")  # absent: saved before it was recorded
    if saved is not None and saved != rows:
        raise UserError(f"checkpoint {path} has a vocabulary of {saved} rows, but this run's tokenizer and "
                        f"model.vocab_size give {rows}: resume with the data.tokenizer and model.vocab_size it was "
                        "saved with, or start a new run.dir")


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
