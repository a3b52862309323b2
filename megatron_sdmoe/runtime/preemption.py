"""Stopping early without losing work: SLURM's warning signal (`--signal=USR1@120`), SIGTERM
(preemption, scancel), Ctrl-C (SIGINT; a second one stops at once) and a wall-clock budget all
end training after the current step with a checkpoint, and the process exits with EXIT_REQUEUE
so the job script requeues it; the next start resumes from `latest`.
"""
from __future__ import annotations

import contextlib
import signal
import sys
import time
from collections.abc import Iterator

import psutil
import torch
import torch.distributed as dist

from megatron_sdmoe import early_stops

EXIT_REQUEUE = 3  # "saved, stopped early: requeue me" (launch scripts act on it)
SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)
# The time budget counts from the process's start: imports and loading a checkpoint take part of it.
STARTED = time.monotonic() - (time.time() - psutil.Process().create_time())


@contextlib.contextmanager
def stop_signals_caught() -> Iterator[None]:
    """Within: until training begins, SIGUSR1 and SIGTERM are remembered instead of ending the
    process (setting up, e.g. a checkpoint's re-cut, can take minutes at scale): the run then stops
    after its first step with a checkpoint and EXIT_REQUEUE, as it would have during training. A
    SIGTERM meant to end a start (a failed peer's launcher, scancel) therefore waits for the SIGKILL
    that follows it. (Ctrl-C still stops a start at once.) On the way out the handlers found are
    restored: the entry point may run inside another program (a test), whose forked workers must
    still die of SIGTERM."""
    before = {sig: signal.getsignal(sig) for sig in SIGNALS}
    for sig in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(sig, lambda signum, _frame: early_stops.append(signal.Signals(signum).name))
    try:
        yield
    finally:
        early_stops.clear()  # handled: another run in this process (a test) starts without them
        for sig, handler in before.items():
            signal.signal(sig, handler)


class StopRequest:
    """Set by a signal on any rank or by the time budget; every rank learns it at the same step."""

    def __init__(self, budget_minutes: float, device: torch.device, save_seconds: float = 0.0):
        """`save_seconds`: how long a save may take before one has been timed (a resumed run's
        checkpoint load: the same bytes)."""
        self.deadline = STARTED + budget_minutes * 60 if budget_minutes > 0 else None
        self.device, self.reason = device, None
        self.longest_step, self.longest_save = 0.0, save_seconds
        for sig in SIGNALS:
            signal.signal(sig, self._on_signal)
        self.reason = self.reason or (early_stops[0] if early_stops else None)  # read once no signal can slip past

    def _on_signal(self, signum, _frame) -> None:
        self.reason = signal.Signals(signum).name  # acted on after the current step
        if signum == signal.SIGINT:  # Ctrl-C; a second one stops at once (KeyboardInterrupt)
            signal.signal(signal.SIGINT, signal.default_int_handler)
            if dist.get_rank() == 0:
                print("\nCtrl-C: stopping after this step with a checkpoint (again: at once, without one)",
                      file=sys.stderr, flush=True)

    def after_step(self, step_seconds: float, saving: bool = False) -> str | None:
        """Called by every rank after every step (a collective): why to stop now, or None.
        The budget keeps room for one more step and the checkpoint after it, each of the longest
        length seen so far, and, when this step saves anyway (`saving`: train.save_interval), for
        that save too; a stop then makes it the stop's checkpoint."""
        self.longest_step = max(self.longest_step, step_seconds)
        needed = self.longest_step + self.longest_save * (2 if saving else 1)
        if self.reason is None and self.deadline is not None and time.monotonic() + needed > self.deadline:
            self.reason = "time budget"
        flag = torch.tensor([self.reason is not None], dtype=torch.float32, device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return (self.reason or "a stop request on another rank") if flag.item() else None

    def saved(self, seconds: float) -> None:
        """A checkpoint took `seconds` to write: the budget keeps room for one as long."""
        self.longest_save = max(self.longest_save, seconds)
