"""torchrun that keeps the training's exit code and passes SLURM's warning signal on.

    python -m megatron_sdmoe.launch.torchrun [torchrun options] -m megatron_sdmoe.train CONFIG ...

Plain torchrun exits with 1 whenever a worker fails, SIGUSR1 kills it, and on SIGTERM or SIGINT
it ends its workers itself (the signal, then SIGKILL after 30 s, however far a checkpoint has got)
and exits with a traceback. The launchers need otherwise: exit code 3 means "saved, stopped early:
requeue me" (2: bad input, 4: diverged), and SIGUSR1 (SLURM's warning before the time limit),
SIGTERM and SIGINT ask every worker to save and stop. So this runs torchrun in this process, sends
those signals on to its workers (they run in sessions of their own, out of reach of a signal to this
process group), lets torchrun wait for them as for any ending, and exits with the exit code of the
first worker that failed.
"""
from __future__ import annotations

import signal
import sys

import psutil
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import parse_args
from torch.distributed.run import run as torchrun

PASSED_ON = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)


def _forward_to_workers(signum: int, _frame) -> None:
    for worker in psutil.Process().children():
        try:
            worker.send_signal(signum)
        except psutil.NoSuchProcess:  # ended meanwhile
            pass


def run(argv: list[str]) -> int:
    """torchrun with `argv`; returns the first failed worker's exit code (shell style, 128 + N for
    signal N), or 0."""
    for signum in PASSED_ON:
        signal.signal(signum, _forward_to_workers)
    try:  # torchrun installs its own handlers, when it starts the workers, for the signals not passed on
        torchrun(parse_args(["--signals-to-handle=SIGHUP,SIGQUIT", *argv]))
    except ChildFailedError as e:
        code = e.get_first_failure()[1].exitcode
        return code if code >= 0 else 128 - code
    return 0


def main() -> None:
    sys.exit(run(sys.argv[1:]))


if __name__ == "__main__":
    main()
