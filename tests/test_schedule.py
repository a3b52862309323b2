"""The LR schedules equal torch's own schedulers composed the same way: linear warmup (LinearLR),
then CosineAnnealingLR (cosine), ConstantLR (constant), or ConstantLR and a LinearLR decay over
the last decay_fraction of the steps (wsd), chained by SequentialLR."""
import dataclasses
import warnings

import pytest
import torch

from megatron_sdmoe.config import LR_SCHEDULES, TrainConfig
from megatron_sdmoe.training.schedule import lr_schedule

L = torch.optim.lr_scheduler


def lrs(optimizer, scheduler, steps: int) -> list[float]:
    out = []
    for _ in range(steps):
        out.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return out


def one_param_sgd(lr: float) -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)


def torch_reference(tr: TrainConfig) -> list[float]:
    optimizer = one_param_sgd(tr.lr)
    warmup = L.LinearLR(optimizer, start_factor=1 / tr.warmup_steps, end_factor=1.0, total_iters=tr.warmup_steps - 1)
    stable = L.ConstantLR(optimizer, factor=1.0, total_iters=0)
    if tr.lr_schedule == "cosine":
        rest = [L.CosineAnnealingLR(optimizer, T_max=tr.max_steps - tr.warmup_steps, eta_min=tr.lr * tr.min_lr_ratio)]
        milestones = [tr.warmup_steps]
    elif tr.lr_schedule == "constant":
        rest, milestones = [stable], [tr.warmup_steps]
    else:
        decay_start = round(tr.max_steps * (1 - tr.decay_fraction))
        rest = [stable, L.LinearLR(optimizer, 1.0, tr.min_lr_ratio, total_iters=tr.max_steps - decay_start)]
        milestones = [tr.warmup_steps, decay_start]
    with warnings.catch_warnings():  # SequentialLR's warning about the order of step() calls
        warnings.simplefilter("ignore")
        return lrs(optimizer, L.SequentialLR(optimizer, [warmup, *rest], milestones=milestones), tr.max_steps)


@pytest.mark.parametrize("kind", LR_SCHEDULES)
@pytest.mark.parametrize("warmup_steps, max_steps, decay_fraction", [(3, 20, 0.25), (2, 37, 0.1), (5, 11, 0.5)])
def test_schedule_equals_torch_schedulers(kind, warmup_steps, max_steps, decay_fraction):
    tr = dataclasses.replace(TrainConfig(), lr_schedule=kind, lr=0.01, warmup_steps=warmup_steps, max_steps=max_steps,
                             min_lr_ratio=0.1, decay_fraction=decay_fraction)
    optimizer = one_param_sgd(tr.lr)
    got = lrs(optimizer, lr_schedule(optimizer, tr), tr.max_steps)
    assert got == pytest.approx(torch_reference(tr), rel=1e-12, abs=1e-15)
