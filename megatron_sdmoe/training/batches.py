"""The global batch of each step: `train.global_batch_size` throughout, or a batch-size warmup by
tokens consumed (`train.batch_size_schedule`).

The schedule is megatron-core's step batch-size schedule ("THRESHOLD:BATCH ..." pairs, thresholds
in tokens with K / M / B / T suffixes, the first at 0; megatron.core.num_microbatches_calculator
parses and checks it): a step's batch is that of the last threshold its samples-so-far reached. The
data position of step k is the samples the steps before it consumed, a pure function of k, so
resume stays exact and every layout reads the same samples.
"""
from __future__ import annotations

import bisect
import math

from megatron.core.num_microbatches_calculator import StepBatchsizeNumMicroBatchesCalculator

from megatron_sdmoe.config import Config, data_parallel_size
from megatron_sdmoe.errors import UserError


def schedule_entries(cfg: Config) -> list[tuple[int, int]]:
    """(threshold in samples, global batch) pairs, ascending; one pair without a schedule."""
    schedule = cfg.train.batch_size_schedule
    if not schedule:
        return [(0, cfg.train.global_batch_size)]
    try:  # rank -1: megatron-core's calculator logs its schedule on rank 0; the start line does here
        return StepBatchsizeNumMicroBatchesCalculator(1, 1, False, -1, schedule, cfg.data.seq_length).schedule
    except (ValueError, AssertionError) as e:
        raise UserError(f"train.batch_size_schedule={schedule!r}: {e}: write 'TOKENS:BATCH' pairs from 0 on, "
                        "e.g. '0:256 10B:1024'") from None


class BatchSchedule:
    """Each step's global batch and first sample. Steps run in segments of one batch size: a
    segment lasts until its samples reach the next threshold (an entry whose threshold an earlier
    batch jumps over is never used, as in megatron-core)."""

    def __init__(self, cfg: Config):
        entries = schedule_entries(cfg)
        self.steps, self.samples, self.sizes = [], [], []  # each segment's first step, first sample, batch
        step = sample = 0
        for (_, size), (threshold, _) in zip(entries, [*entries[1:], (math.inf, 0)]):
            if sample >= threshold:
                continue
            self.steps.append(step)
            self.samples.append(sample)
            self.sizes.append(size)
            if threshold == math.inf:
                break
            count = -(-(threshold - sample) // size)  # steps until the samples reach the threshold
            step, sample = step + count, sample + count * size

    def _segment(self, step: int) -> int:
        return bisect.bisect_right(self.steps, step) - 1

    def size(self, step: int) -> int:
        """The global batch of step `step` (0-based)."""
        return self.sizes[self._segment(step)]

    def first_sample(self, step: int) -> int:
        """The samples the steps before `step` consumed: where its global batch starts."""
        segment = self._segment(step)
        return self.samples[segment] + (step - self.steps[segment]) * self.sizes[segment]

    def sizes_in(self, first_step: int, last_step: int) -> set[int]:
        """The batch sizes steps [first_step, last_step) use."""
        last = self._segment(max(last_step - 1, first_step))
        return {self.sizes[s] for s in range(self._segment(first_step), last + 1)}


def check_batches(cfg: Config, world_size: int, first_step: int) -> None:
    """Refuse a batch of steps [first_step, train.max_steps) that the micro-batches of `world_size`
    processes cannot make up. Earlier steps' batches may not divide: a run can move to more GPUs
    once its warmup has passed them."""
    per_step = cfg.train.micro_batch_size * data_parallel_size(cfg, world_size)
    for size in sorted(BatchSchedule(cfg).sizes_in(first_step, cfg.train.max_steps)):
        if size % per_step:
            raise UserError(f"train.batch_size_schedule's global batch {size} (from step {first_step} on) is not "
                            f"divisible by train.micro_batch_size x data-parallel size = {per_step}: make each "
                            f"batch a multiple of {per_step}, or change the layout")
