"""`train.profile_steps: [first, last]`: torch.profiler over those optimizer steps (1-based), written
to <run.dir>/profile/ per rank: `trace_rank<r>.json` (open in https://ui.perfetto.dev or
chrome://tracing) and `ops_rank<r>.txt`, the operators by self time on the device (on the CPU
without a GPU)."""
from __future__ import annotations

from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

ROWS = 50  # operators in the table
REGIONS = ("sdmoe_refresh_bases",)  # record_function ranges of the loop, summed below the table


class StepProfiler:
    def __init__(self, steps: list[int], run_dir: Path, rank: int):
        self.first, self.last = steps if steps else (0, -1)
        self.out, self.rank = run_dir / "profile", rank
        self.cuda = torch.cuda.is_available()
        self.active: profile | None = None

    def before_step(self, step: int) -> None:
        """Called before each step that trains: the profile starts at the window's first such step
        (skipped batches, or a resume inside the window, may leave out its first steps)."""
        if self.active is not None and step > self.last:  # the window's last steps were skipped
            self.close()
        if self.active is None and self.first <= step <= self.last:
            activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if self.cuda else [])]
            self.active = profile(activities=activities)
            self.active.start()

    def after_step(self, step: int) -> None:
        if step == self.last:
            self.close()

    def close(self) -> None:
        """Stop and write (also when the run ends or stops before the last profiled step)."""
        if self.active is None:
            return
        if self.cuda:
            torch.cuda.synchronize()
        self.active.stop()
        self.out.mkdir(exist_ok=True)
        self.active.export_chrome_trace(str(self.out / f"trace_rank{self.rank}.json"))
        sort = "self_cuda_time_total" if self.cuda else "self_cpu_time_total"
        averages = self.active.key_averages()
        regions = [f"{op.key}: {op.count} calls, CPU {op.cpu_time_total / 1e3:.1f} ms, device "
                   f"{op.device_time_total / 1e3:.1f} ms" for op in averages if op.key in REGIONS]
        (self.out / f"ops_rank{self.rank}.txt").write_text(
            "\n".join([f"steps {self.first}-{self.last}", averages.table(sort_by=sort, row_limit=ROWS), *regions]) + "\n")
        self.active = None
