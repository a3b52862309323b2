"""Learning-rate schedules: linear warmup, then cosine decay to lr * min_lr_ratio at max_steps
(`cosine`), constant LR with a linear decay over the last decay_fraction of max_steps (`wsd`,
warmup-stable-decay: a run can be extended from any checkpoint before its decay), or constant.

The schedule's clock is the optimizer step, or (train.lr_schedule_unit: tokens) the tokens consumed,
counted in batches of train.global_batch_size: under a batch-size warmup the LR then follows the
data seen, as Megatron-LM's sample-based schedule does. Without a batch warmup the two are equal."""
from __future__ import annotations

import math

import torch

from megatron_sdmoe.config import Config
from megatron_sdmoe.training.batches import BatchSchedule


class LRMultiplier:
    """LR multiplier for optimizer step `step` (0-based); picklable, so LambdaLR can save it."""

    def __init__(self, cfg: Config):
        train = cfg.train
        self.kind, self.warmup_steps, self.min_lr_ratio = train.lr_schedule, train.warmup_steps, train.min_lr_ratio
        self.batches = BatchSchedule(cfg) if train.lr_schedule_unit == "tokens" else None
        self.full_batch = train.global_batch_size
        self.end = self.clock(train.max_steps)
        # wsd: the decay's first step; at least one step after warmup decays
        self.decay_start = max(self.warmup_steps, round(self.end * (1 - train.decay_fraction)))

    def clock(self, step: int) -> float:
        """The schedule's time before step `step`: the steps, or the samples they consumed in full batches."""
        return step if self.batches is None else self.batches.first_sample(step) / self.full_batch

    def __call__(self, step: int) -> float:
        before, after = self.clock(step), self.clock(step + 1)
        if after <= self.warmup_steps:  # warmup counts this step as done: the first step is not at LR 0
            return after / self.warmup_steps
        if self.kind == "constant" or (self.kind == "wsd" and before < self.decay_start):
            return 1.0
        start = self.warmup_steps if self.kind == "cosine" else self.decay_start
        # at least 0: a step whose batch ends the warmup starts the decay
        progress = min(1.0, max(0.0, (before - start) / max(1, self.end - start)))
        shape = 0.5 * (1 + math.cos(math.pi * progress)) if self.kind == "cosine" else 1 - progress
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * shape


def schedule_notes(cfg: Config) -> list[str]:
    """Notes at start for a schedule that would surprise: a warmup the run does not finish (short
    benchmark runs of real configs are meant so), or a decay that no step of the run reaches."""
    tr, multiplier = cfg.train, LRMultiplier(cfg)
    last = multiplier(tr.max_steps - 1)
    if multiplier.clock(tr.max_steps) < tr.warmup_steps:
        return [f"note: train.warmup_steps={tr.warmup_steps} outlasts the run (train.max_steps={tr.max_steps}): "
                f"the LR peaks at {last:.3g} x train.lr"]
    if tr.lr_schedule != "constant" and tr.min_lr_ratio < 1 and last == 1.0:
        return [f"note: no step decays the LR (train.lr_schedule={tr.lr_schedule}, warmup_steps={tr.warmup_steps}, "
                f"decay_fraction={tr.decay_fraction}, max_steps={tr.max_steps}): for a decay, raise "
                "train.decay_fraction (wsd) or train.max_steps, or lower train.warmup_steps"]
    return []


def lr_schedule(optimizer: torch.optim.Optimizer, cfg: Config) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, LRMultiplier(cfg))


def resume_schedule(scheduler: torch.optim.lr_scheduler.LambdaLR, saved: dict) -> None:
    """Continue at the saved schedule's position (`last_epoch`: the optimizer steps applied) with this
    run's settings: train.lr, lr_schedule, lr_schedule_unit, warmup_steps, max_steps, min_lr_ratio and
    decay_fraction may change on resume, e.g. to train longer. LambdaLR.load_state_dict is not used: it
    brings back the saved run's base LRs and multiplier attributes, so a changed setting would be
    silently ignored."""
    scheduler.last_epoch = saved["last_epoch"]
    lrs = [base * multiplier(scheduler.last_epoch) for base, multiplier in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, lr in zip(scheduler.optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = lrs  # what get_last_lr() reports, kept in this attribute by torch's schedulers
