"""Bad input that only the files show, refused before anything is written: a checkpoint in run.dir
that this run cannot load (another model, another layout), data files too small to give a sample,
and weights to start from (model.init_from) that are not all there. sdmoe-launch and sdmoe-submit
run these checks before they start or submit anything; sdmoe-train runs them on every rank (ranks
on different nodes may see different files) before it writes anything.
"""
from __future__ import annotations

import os
from pathlib import Path

from megatron_sdmoe.config import Config, load_config
from megatron_sdmoe.convert.weights import WeightDirectory
from megatron_sdmoe.data.datasets import checked_blends, sample_corpus_prefix
from megatron_sdmoe.errors import UserError
from megatron_sdmoe.training.batches import check_batches
from megatron_sdmoe.training.checkpoint import latest_checkpoint, saved_step
from megatron_sdmoe.training.resume_checks import check_added_steps, check_finished_stages, check_resumable
from megatron_sdmoe.training.stages import stage_blends
from megatron_sdmoe.validation import validate


def checked_config(path: str, overrides: list[str], world_size: int) -> Config:
    """CONFIG + overrides, validated for `world_size` processes and against run.dir's checkpoint and the data."""
    cfg = load_config(path, overrides)
    validate(cfg, world_size)
    check_files(cfg, world_size)
    return cfg


def check_files(cfg: Config, world_size: int, checkpoint: Path | None = None, need_checkpoint: bool = False) -> None:
    """The checks against the files of a validated config, as this process sees them: the checkpoint
    it starts from (`checkpoint`, by default run.dir's latest; with `need_checkpoint` there must be
    one), the data, model.init_from."""
    checkpoint = checkpoint or latest_checkpoint(Path(cfg.run.dir))
    if need_checkpoint and checkpoint is None:
        raise UserError(f"run.dir {cfg.run.dir} holds no checkpoint: pass a run directory that has saved one "
                        "(train.save_interval, or the end of its run)")
    check_resumable(cfg, world_size, checkpoint)
    step = saved_step(checkpoint)
    if cfg.data.cache_dir:
        check_writable(Path(cfg.data.cache_dir), "data.cache_dir")
    if not need_checkpoint:  # training goes on from it (sdmoe-eval reads a checkpoint of any step, on any data)
        check_writable(Path(cfg.run.dir), "run.dir")
        if step > cfg.train.max_steps:
            raise UserError(f"train.max_steps={cfg.train.max_steps} lies before step {step} of the checkpoint it "
                            f"resumes from ({checkpoint}): raise train.max_steps, or sdmoe-checkpoints rollback to an "
                            "earlier step")
        check_finished_stages(checkpoint, cfg)
        check_added_steps(checkpoint, cfg)
    check_batches(cfg, world_size, step)
    for stage in stage_blends(cfg):
        path = stage.path or [sample_corpus_prefix(cfg.data.tokenizer)]  # empty: the built-in corpus
        checked_blends(cfg, path, stage.valid_path, stage.test_path, stage.samples, cfg.train.eval_samples,
                       stage.section)
    if cfg.model.init_from and checkpoint is None:  # a resumed run reads its checkpoint
        WeightDirectory(cfg.model.init_from)  # the index and every shard it names


def check_writable(directory: Path, setting: str) -> None:
    """Refuse, making nothing, a directory (the value of `setting`) that could not be made or written
    into: its nearest existing part must be a directory this process may write into. (What only a
    write shows, a read-only filesystem or a full disk, is refused when training writes.)"""
    existing = directory
    while not existing.exists():
        existing = existing.parent
    problem = ("Not a directory" if not existing.is_dir() else
               None if os.access(existing, os.W_OK | os.X_OK) else "Permission denied")
    if problem:
        raise UserError(f"{setting} {directory} is not writable ({problem}): choose another {setting}")
