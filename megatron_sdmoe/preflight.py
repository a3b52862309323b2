"""Bad input that only the files show, refused before anything is written: a checkpoint in run.dir
that this run cannot load (another model, another layout) and data files too small to give a
sample. sdmoe-train runs these checks on every rank before it starts; sdmoe-launch and
sdmoe-submit run them before they start or submit anything.
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

from megatron_sdmoe.config import Config, load_config, validate
from megatron_sdmoe.data.datasets import checked_blends
from megatron_sdmoe.errors import UserError
from megatron_sdmoe.training.checkpoint import check_resumable
from megatron_sdmoe.training.stages import stage_blends


def checked_config(path: str, overrides: list[str], world_size: int) -> Config:
    """CONFIG + overrides, validated for `world_size` processes and against run.dir's checkpoint and the data."""
    cfg = load_config(path, overrides)
    validate(cfg, world_size)
    check_resumable(cfg, world_size)
    for _name, blend, valid_blend, _steps in stage_blends(cfg):
        if blend:  # empty: the built-in sample corpus, checked where it is built
            checked_blends(cfg, blend, valid_blend, cfg.train.eval_samples)
    return cfg


@contextmanager
def writing_into(run_dir: Path):
    """Turn a failure to write into run.dir into the one-line bad-input error."""
    try:
        yield
    except OSError as e:
        raise UserError(f"run.dir {run_dir} is not writable ({e.strerror}): choose another run.dir") from e
