"""The LR schedules equal torch's own schedulers composed the same way: linear warmup (LinearLR),
then CosineAnnealingLR (cosine), ConstantLR (constant), or ConstantLR and a LinearLR decay over
the last decay_fraction of the steps (wsd), chained by SequentialLR. In tokens under a batch
warmup they equal megatron-core's sample-based OptimizerParamScheduler. A warmup the run does not
finish, or a decay no step reaches, is noted at start."""
import dataclasses
import warnings

import pytest
import torch

from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megatron_sdmoe.config import LR_SCHEDULE_UNITS, LR_SCHEDULES, Config, TrainConfig
from megatron_sdmoe.training.batches import BatchSchedule
from megatron_sdmoe.training.schedule import lr_schedule, schedule_notes

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


def with_train(**train) -> Config:
    return dataclasses.replace(Config(), train=dataclasses.replace(TrainConfig(), **{"lr": 0.01, "min_lr_ratio": 0.1,
                                                                                      **train}))


@pytest.mark.parametrize("unit", LR_SCHEDULE_UNITS)  # without a batch warmup tokens and steps agree
@pytest.mark.parametrize("kind", LR_SCHEDULES)
@pytest.mark.parametrize("warmup_steps, max_steps, decay_fraction, min_lr_ratio",
                         [(3, 20, 0.25, 0.1), (2, 37, 0.1, 0.0), (5, 11, 0.5, 0.3)])
def test_schedule_equals_torch_schedulers(unit, kind, warmup_steps, max_steps, decay_fraction, min_lr_ratio):
    cfg = with_train(lr_schedule=kind, lr_schedule_unit=unit, warmup_steps=warmup_steps, max_steps=max_steps,
                     decay_fraction=decay_fraction, min_lr_ratio=min_lr_ratio)
    optimizer = one_param_sgd(cfg.train.lr)
    got = lrs(optimizer, lr_schedule(optimizer, cfg), cfg.train.max_steps)
    assert got == pytest.approx(torch_reference(cfg.train), rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("kind", LR_SCHEDULES)
def test_in_tokens_under_a_batch_warmup_it_is_megatron_cores_sample_schedule(kind):
    """Batch 4 for 5 steps, 8 for 3, then 16 (the full batch): the warmup over 3 full batches (48
    samples) ends inside the 9th step's batch, the decay (wsd: the last 30%) at the run's 396 samples. megatron-core's
    scheduler advances by each step's samples; a step's LR is its value at the samples before the
    step, except that the warmup counts the step's own samples (so the first step is not at LR 0)
    and the step that ends the warmup is at the peak."""
    cfg = with_train(lr_schedule=kind, lr_schedule_unit="tokens", warmup_steps=3, max_steps=30, decay_fraction=0.3,
                     global_batch_size=16, batch_size_schedule="0:4 1280:8 2560:16")
    cfg.data.seq_length = 64  # thresholds at samples 20 and 40
    batches = BatchSchedule(cfg)
    total, warmup = batches.first_sample(30), 3 * 16
    optimizer = one_param_sgd(cfg.train.lr)
    got = lrs(optimizer, lr_schedule(optimizer, cfg), 30)
    decay_start = round(total / 16 * 0.7) * 16
    reference = OptimizerParamScheduler(
        one_param_sgd(cfg.train.lr), init_lr=0.0, max_lr=0.01, min_lr=0.001, lr_warmup_steps=warmup,
        lr_decay_steps=total, lr_decay_style={"wsd": "WSD"}.get(kind, kind), start_wd=0.1, end_wd=0.1,
        wd_incr_steps=total, wd_incr_style="constant", wsd_decay_steps=total - decay_start, lr_wsd_decay_style="linear")
    for step, lr in enumerate(got):
        before, after = batches.first_sample(step), batches.first_sample(step + 1)
        reference.num_steps = after if after <= warmup else max(before, warmup)
        assert lr == pytest.approx(reference.get_lr({}), rel=1e-12), step
    assert [batches.size(step) for step in (4, 5, 7, 8)] == [4, 8, 8, 16] and total == 396


@pytest.mark.parametrize("train, note", [
    (dict(warmup_steps=20, max_steps=10),
     "note: train.warmup_steps=20 outlasts the run (train.max_steps=10): the LR peaks at 0.5 x train.lr"),
    # 4% of 10 steps rounds to no decay; a warmup into the decay window leaves it one step, at LR 1
    (dict(lr_schedule="wsd", warmup_steps=2, max_steps=10, decay_fraction=0.04),
     "note: no step decays the LR (train.lr_schedule=wsd, warmup_steps=2, decay_fraction=0.04, max_steps=10)"),
    (dict(lr_schedule="wsd", warmup_steps=9, max_steps=10, decay_fraction=0.5), "note: no step decays the LR"),
    (dict(warmup_steps=9, max_steps=10), "note: no step decays the LR (train.lr_schedule=cosine"),
    (dict(lr_schedule="wsd", warmup_steps=2, max_steps=10, decay_fraction=0.2), None),
    (dict(warmup_steps=3, max_steps=20), None), (dict(lr_schedule="constant", warmup_steps=3, max_steps=20), None)])
def test_a_schedule_that_would_surprise_is_noted(train, note):
    notes = schedule_notes(with_train(**train))
    assert notes == [] if note is None else len(notes) == 1 and notes[0].startswith(note), notes
