"""torchrun that keeps the training's exit code and passes SLURM's warning signal on.

    python -m megatron_sdmoe.launch.torchrun [torchrun options] -m megatron_sdmoe.train CONFIG ...

Plain torchrun exits with 1 whenever a worker fails, and SIGUSR1 kills it. The launchers need
both: exit code 3 means "saved, stopped early: requeue me" (2: bad input, 4: diverged), and SIGUSR1
is SLURM's warning before the time limit, on which every worker saves and stops. So this runs
torchrun in this process, sends SIGUSR1 on to its workers (they run in sessions of their own, out of
reach of a signal to this process group), and exits with the exit code of the first worker that
failed. SIGTERM is torchrun's own: it passes it on to the workers.
"""
from __future__ import annotations

import signal
import sys

import psutil
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import parse_args
from torch.distributed.run import run as torchrun


def _forward_to_workers(signum: int, _frame) -> None:
    for worker in psutil.Process().children():
        try:
            worker.send_signal(signum)
        except psutil.NoSuchProcess:  # ended meanwhile
            pass


def run(argv: list[str]) -> int:
    """torchrun with `argv`; returns the first failed worker's exit code (shell style, 128 + N for
    signal N), or 0."""
    signal.signal(signal.SIGUSR1, _forward_to_workers)
    try:
        torchrun(parse_args(argv))
    except ChildFailedError as e:
        code = e.get_first_failure()[1].exitcode
        return code if code >= 0 else 128 - code
    return 0


def main() -> None:
    sys.exit(run(sys.argv[1:]))


if __name__ == "__main__":
    main()
