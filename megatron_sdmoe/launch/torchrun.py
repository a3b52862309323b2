"""torchrun that keeps the training's exit code and passes the stop signals on to its workers.

    python -m megatron_sdmoe.launch.torchrun [torchrun options] -m megatron_sdmoe.train CONFIG ...

Plain torchrun exits with 1 whenever a worker fails, SIGUSR1 kills it, and on SIGTERM or SIGINT
it ends its workers itself (the signal, then SIGKILL after 30 s, however far a checkpoint has got)
and exits with a traceback. The launchers need otherwise: exit code 3 means "saved, stopped early:
requeue me" (2: bad input, 4: diverged), and SIGUSR1 (SLURM's warning before the time limit),
SIGTERM and SIGINT ask every worker to save and stop. So this runs torchrun in this process, sends
those signals on to its workers (they run in sessions of their own, out of reach of a signal to this
process group), lets torchrun wait for them as for any ending, and exits with the exit code of the
first worker that failed. A SIGUSR1 before the workers exist (the rendezvous) reaches them as they
start, through their environment. A SIGTERM or SIGINT with no worker to take it (during the
rendezvous), or sent again (a worker hung while saving), ends the launch as torchrun would: the
signal to the workers, SIGKILL 30 s later.
"""
from __future__ import annotations

import os
import signal
import sys

import psutil
from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import parse_args
from torch.distributed.run import run as torchrun

from megatron_sdmoe import KEEP_EARLY_STOPS, LAUNCHER_STOP
from megatron_sdmoe.runtime.preemption import SIGNALS as PASSED_ON

_passed_on: set[int] = set()


def _forward_to_workers(signum: int, _frame) -> None:
    workers = psutil.Process().children()
    if signum == signal.SIGUSR1 and not workers:  # the rendezvous: the workers started next inherit it
        os.environ[LAUNCHER_STOP] = signal.Signals(signum).name
        return
    if signum != signal.SIGUSR1 and (not workers or signum in _passed_on):
        # torchrun's own handling: its agent ends the workers, then this raises out of torchrun
        raise SignalException(f"got {signal.Signals(signum).name}", sigval=signal.Signals(signum))
    _passed_on.add(signum)
    for worker in workers:
        try:
            worker.send_signal(signum)
        except psutil.NoSuchProcess:  # ended meanwhile
            pass


def run(argv: list[str]) -> int:
    """torchrun with `argv`; returns the first failed worker's exit code (shell style, 128 + N for
    signal N), or 0."""
    for signum in PASSED_ON:
        signal.signal(signum, _forward_to_workers)
    os.environ[KEEP_EARLY_STOPS] = "1"  # the workers keep a stop passed on while they import
    try:  # torchrun installs its own handlers, when it starts the workers, for the signals not passed on
        torchrun(parse_args(["--signals-to-handle=SIGHUP,SIGQUIT", *argv]))
    except ChildFailedError as e:
        code = e.get_first_failure()[1].exitcode
        return code if code >= 0 else 128 - code
    except SignalException as e:
        return 128 + e.sigval
    finally:  # a signal after torchrun has returned ends this process as usual
        for signum in PASSED_ON:
            signal.signal(signum, signal.SIG_DFL)
    return 0


def main() -> None:
    sys.exit(run(sys.argv[1:]))


if __name__ == "__main__":
    main()
