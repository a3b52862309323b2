"""Whether a run may start from a checkpoint: the same model (the settings that only steer
training may change), the same batches, the same finished stages' data, the same vocabulary, and
a layout change that reshard.py can make exactly. Each refusal is one line, before anything is
written."""
from __future__ import annotations

import itertools
from pathlib import Path

import torch
import yaml

from megatron_sdmoe.config import (Config, TrainConfig, flat_items, is_headwise, is_sdmoe, resolved_blend,
                                   skipped_batch_ranges, stage_ends, to_dict)
from megatron_sdmoe.errors import UserError
from megatron_sdmoe.training.checkpoint import (LATEST, MODEL_PARALLEL, check_intact, layout_meta, read_meta,
                                                saved_step)

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
        raise UserError(f"checkpoint {path} was saved by another model ({', '.join(differing)}): keep the "
                        "checkpoint's settings (another model trains in a new run.dir)")
    if saved_config:
        for key in BATCH_SETTINGS:
            saved_value, value = saved_config["train"].get(key, getattr(TrainConfig(), key)), getattr(cfg.train, key)
            if saved_value != value:
                raise UserError(f"checkpoint {path} was trained with train.{key}={saved_value}, not {value}: the "
                                "data position counts global batches, so other batches would skip or repeat "
                                f"samples; resume with train.{key}={saved_value}")
        seq_length = saved_config["data"]["seq_length"]
        if cfg.train.batch_size_schedule and seq_length != cfg.data.seq_length:
            raise UserError(f"checkpoint {path} was trained with data.seq_length={seq_length}, not "
                            f"{cfg.data.seq_length}: train.batch_size_schedule's thresholds are tokens, so its batches "
                            "would change at other steps and skip or repeat samples; resume with "
                            f"data.seq_length={seq_length}")
    meta = read_meta(path)
    saved, par = meta["layout"], cfg.parallel
    wanted = layout_meta(world_size, par.tensor, par.expert, par.expert_tensor)
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


SAVED_SECTIONS = ("model", "moe", "train", "data")  # what the checks read (every version saved them)


def _saved_config(checkpoint: Path) -> dict | None:
    """The run's config as the checkpoint saved it (None for checkpoints written without it); a
    damaged one (cut short, edited) refused."""
    path = checkpoint / "config.yaml"
    if not path.exists():
        return None
    try:
        saved = yaml.safe_load(path.read_text())
        reason = None if isinstance(saved, dict) and all(isinstance(saved.get(key), dict) for key in SAVED_SECTIONS) \
            else "sections missing"
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        reason = str(e).splitlines()[0]
    if reason:
        raise UserError(f"checkpoint {checkpoint}: config.yaml is damaged ({reason}): copy the checkpoint again, or "
                        "sdmoe-checkpoints rollback to an earlier one")
    return saved


def _differences(saved: dict, cfg: Config, sections: list[str], allowed=()) -> list[str]:
    """`section.key: saved -> current` for each key of `sections` that differs, those in `allowed` left out."""
    current = to_dict(cfg)
    return [f"{section}.{key}: {old} -> {new}" for section in sections
            for key, old, new in flat_items(saved.get(section, {}), current[section])
            if old != new and f"{section}.{key}" not in allowed]


def changed_settings(path: Path | None, cfg: Config) -> list[str]:
    """`train.key: saved -> current` (and `smoothing.key`, `data.key`) for each setting this run changes
    against the checkpoint it starts from: they take effect from the resumed step on (the LR schedule
    included; other data continues at the same sample index)."""
    saved = _saved_config(path) if path is not None else None
    return _differences(saved, cfg, ["train", "smoothing", "data"]) if saved is not None else []


def check_finished_stages(path: Path | None, cfg: Config) -> None:
    """Refuse a start that changes the stages a run of data.stages finished before checkpoint `path`:
    their ends (each stage's evaluation and data position follow from them: a stage that would end
    before the checkpoint in the new steps was never evaluated), or their data (the stage matrix
    holds each finished stage's validation loss on it, so rows measured on other data would read as
    forgetting)."""
    saved = _saved_config(path) if path is not None else None
    if not saved or not cfg.data.stages or not saved["data"].get("stages"):
        return
    step, ends = saved_step(path), list(itertools.accumulate(stage["steps"] for stage in saved["data"]["stages"]))
    finished, now = [e for e in ends if e <= step], [e for e in stage_ends(cfg) if e <= step]
    if finished != now:
        raise UserError(f"data.stages would have ended at steps {now or 'none'} by the checkpoint's step {step}, but "
                        f"the run's ended at {finished or 'none'}: each stage's evaluation and data position follow "
                        "from them; keep the steps of the stages up to there (later ones may change)")
    for index, (old, new, end) in enumerate(zip(saved["data"]["stages"], cfg.data.stages, ends)):
        if end > step:
            return
        before = [resolved_blend(old.get(key, [])) for key in ("path", "valid_path")]  # (older runs: relative)
        if before != [new.path, new.valid_path]:
            raise UserError(f"data.stages[{index}] ended at step {end} (the checkpoint is at step {step}), and the "
                            "stage matrix holds losses on its data: keep its path and valid_path as the run had them "
                            f"({before[0]}, {before[1]}), or start a new run.dir")


def check_added_steps(path: Path | None, cfg: Config) -> None:
    """Refuse a train.skip_batches range that this start adds (the checkpoint's config lacks it)
    but that begins where the run already is (its batches up to there were trained: skipping those
    before a spike needs a rollback first), or train.profile_steps it adds that end there (nothing
    would be profiled)."""
    saved = _saved_config(path) if path is not None else None
    if not saved:
        return
    step, tr = saved_step(path), cfg.train
    had = {str(item) for item in saved["train"].get("skip_batches", [])}
    for item, (first, last) in zip(tr.skip_batches, skipped_batch_ranges(cfg)):
        if str(item) not in had and first <= step:
            trained = f"steps {first}-{min(last, step)} were" if min(last, step) > first else f"step {first} was"
            raise UserError(f"train.skip_batches has {first}-{last}, but the checkpoint this start resumes from is "
                            f"at step {step}: {trained} trained already; to leave those batches out, first "
                            f"sdmoe-checkpoints rollback {path.parent.parent} to a step before {first}")
    if tr.profile_steps and tr.profile_steps != saved["train"].get("profile_steps") and tr.profile_steps[1] <= step:
        raise UserError(f"train.profile_steps={tr.profile_steps}, but the checkpoint this start resumes from is at "
                        f"step {step}, past them: profile steps after {step}")


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
