"""Learning-rate schedule: linear warmup, then cosine decay to lr * min_lr_ratio at max_steps."""
from __future__ import annotations

import math

import torch


class WarmupCosine:
    """LR multiplier for optimizer step `step` (0-based); picklable, so LambdaLR can save it."""

    def __init__(self, warmup_steps: int, max_steps: int, min_lr_ratio: float):
        self.warmup_steps, self.max_steps, self.min_lr_ratio = warmup_steps, max_steps, min_lr_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        decay_steps = max(1, self.max_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / decay_steps)
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup_steps: int, max_steps: int,
                  min_lr_ratio: float) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(warmup_steps, max_steps, min_lr_ratio))
