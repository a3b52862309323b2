"""`sdmoe-launch CONFIG --gpus N [key=value ...]`: train on N processes of this machine.

    sdmoe-launch configs/tiny-qwen3-moe.yaml --gpus 2 run.dir=runs/ep2 parallel.expert=2

A thin wrapper around `torchrun --standalone --nproc-per-node N -m megatron_sdmoe.train CONFIG ...`:
one process per GPU (without GPUs, N gloo processes on the CPU). Bad input is refused with one line
and exit code 2 before any process starts, and the training's exit code is kept (3: stopped early
with a checkpoint, start again to resume; 4: diverged), which plain torchrun turns into 1. SIGUSR1,
SIGTERM and Ctrl-C stop training after the current step with a checkpoint, as with sdmoe-train.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from megatron_sdmoe.errors import ArgumentParser, UserError, exit_bad_input
from megatron_sdmoe.launch.torchrun import run
from megatron_sdmoe.preflight import checked_config
from megatron_sdmoe.runtime.run_lock import WAIT_OR_STOP, check_free


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(prog="sdmoe-launch", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="YAML config file (see configs/)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    parser.add_argument("--gpus", type=int, default=torch.cuda.device_count() or 1,
                        help="processes to start, one per GPU (default: the visible GPUs; without any, 1)")
    args = parser.parse_intermixed_args(argv)
    try:
        if args.gpus < 1:
            raise UserError(f"--gpus {args.gpus}: start at least 1 process")
        cfg = checked_config(args.config, args.overrides, args.gpus)
        check_free(Path(cfg.run.dir), WAIT_OR_STOP)  # before starting processes that would be refused
    except UserError as e:
        exit_bad_input(e)
    sys.exit(run(["--standalone", f"--nproc-per-node={args.gpus}", "-m", "megatron_sdmoe.train", args.config,
                  *args.overrides]))


if __name__ == "__main__":
    main()
