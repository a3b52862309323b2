"""The real entry point with the loss of some steps made NaN (steps in NAN_STEPS, 1-based, e.g.
"3,4" or "3-100"), as a diverging model would produce: for the non-finite-gradient guard tests."""
import os
import sys

from megatron_sdmoe import train

NAN_STEPS = {int(s) for part in os.environ["NAN_STEPS"].split(",") for s in (
    range(int(part.split("-")[0]), int(part.split("-")[1]) + 1) if "-" in part else [part])}


def poisoned(loss):
    def wrapped(self, dataset, first_sample, micro):
        value = loss(self, dataset, first_sample, micro)
        step = first_sample // self.cfg.train.global_batch_size + 1
        return value * float("nan") if step in NAN_STEPS else value
    return wrapped


if __name__ == "__main__":
    train.Trainer._loss = poisoned(train.Trainer._loss)
    train.main(sys.argv[1:])
