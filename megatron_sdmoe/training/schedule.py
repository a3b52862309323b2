"""Learning-rate schedules: linear warmup, then cosine decay to lr * min_lr_ratio at max_steps
(`cosine`), constant LR with a linear decay over the last decay_fraction of max_steps (`wsd`,
warmup-stable-decay: a run can be extended from any checkpoint before its decay), or constant."""
from __future__ import annotations

import math

import torch

from megatron_sdmoe.config import TrainConfig


class LRMultiplier:
    """LR multiplier for optimizer step `step` (0-based); picklable, so LambdaLR can save it."""

    def __init__(self, train: TrainConfig):
        self.kind, self.warmup_steps, self.max_steps = train.lr_schedule, train.warmup_steps, train.max_steps
        self.min_lr_ratio = train.min_lr_ratio
        # wsd: the decay's first step; at least one step after warmup decays
        self.decay_start = max(self.warmup_steps, round(train.max_steps * (1 - train.decay_fraction)))

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.kind == "constant" or (self.kind == "wsd" and step < self.decay_start):
            return 1.0
        start = self.warmup_steps if self.kind == "cosine" else self.decay_start
        progress = min(1.0, (step - start) / max(1, self.max_steps - start))
        shape = 0.5 * (1 + math.cos(math.pi * progress)) if self.kind == "cosine" else 1 - progress
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * shape


def lr_schedule(optimizer: torch.optim.Optimizer, train: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, LRMultiplier(train))


def resume_schedule(scheduler: torch.optim.lr_scheduler.LambdaLR, saved: dict) -> None:
    """Continue at the saved schedule's position (`last_epoch`: the optimizer steps applied) with this
    run's settings: train.lr, lr_schedule, warmup_steps, max_steps, min_lr_ratio and decay_fraction
    may change on resume, e.g. to train longer. LambdaLR.load_state_dict is not used: it brings back
    the saved run's base LRs and multiplier attributes, so a changed setting would be silently ignored."""
    scheduler.last_epoch = saved["last_epoch"]
    lrs = [base * multiplier(scheduler.last_epoch) for base, multiplier in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, lr in zip(scheduler.optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = lrs  # what get_last_lr() reports, kept in this attribute by torch's schedulers
