"""The real entry point, sending itself SIGUSR1 (SLURM's warning) during the step SIGNAL_AT_STEP
(1-based; 0: while the run is set up), as a job whose time is running out would receive it."""
import os
import signal
import sys

from megatron_sdmoe import train

SIGNAL_AT_STEP = int(os.environ["SIGNAL_AT_STEP"])


def signal_self() -> None:
    os.kill(os.getpid(), signal.SIGUSR1)


def signalling_loss(loss):
    def wrapped(self, dataset, first_sample, micro):
        if first_sample // self.cfg.train.global_batch_size + 1 == SIGNAL_AT_STEP and micro == 0:
            signal_self()
        return loss(self, dataset, first_sample, micro)
    return wrapped


def signalling_setup(setup):
    def wrapped(*args, **kwargs):
        signal_self()
        return setup(*args, **kwargs)
    return wrapped


if __name__ == "__main__":
    if SIGNAL_AT_STEP:
        train.Trainer._loss = signalling_loss(train.Trainer._loss)
    else:
        train.setup = signalling_setup(train.setup)
    train.main(sys.argv[1:])
