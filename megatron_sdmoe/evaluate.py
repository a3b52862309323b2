"""sdmoe-eval: the validation and test losses of a run's latest checkpoint (or, with --step, an
earlier one), as its training measures them, in any layout and on the run's own data or other data
(`data.*` overrides). Nothing in the run directory changes (megatron's data index cache aside).

    sdmoe-eval runs/demo
    sdmoe-eval runs/demo --step 100
    sdmoe-eval runs/demo "data.valid_path=[/data/wiki]" "data.test_path=[/data/books]" train.eval_samples=256
    torchrun --nproc-per-node 2 -m megatron_sdmoe.evaluate runs/demo parallel.expert=2 --json eval.json
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

import torch

from megatron_sdmoe.checkpoints import checkpoint_of_step
from megatron_sdmoe.config import Config, load_config
from megatron_sdmoe.errors import EXIT_BAD_INPUT, UserError, out_of_memory_line, writing_into
from megatron_sdmoe.runtime import shutdown
from megatron_sdmoe.runtime.distributed import rank_from_env, world_size_from_env
from megatron_sdmoe.train import setup
from megatron_sdmoe.validation import validate


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="sdmoe-eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a run directory sdmoe-train wrote (its config.yaml "
                        "and checkpoints/latest are read)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotted overrides of the run's config: data.* (other data), train.eval_samples, "
                             "train.micro_batch_size, parallel.* (another layout), train.precision")
    parser.add_argument("--step", type=int, help="the checkpoint of this step (sdmoe-checkpoints list RUN_DIR shows "
                        "them) instead of the latest")
    parser.add_argument("--json", metavar="FILE", help="also write the losses as a JSON object to FILE")
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # as sdmoe-train's
    return parser.parse_args(argv)


def run_config(run_dir: str, overrides: list[str]) -> Config:
    """The config the run last started with (its config.yaml), with `overrides`; run.dir is RUN_DIR."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise UserError(f"{run_dir} holds no config.yaml: pass a run directory that sdmoe-train wrote")
    if any(item.partition("=")[0] == "run.dir" for item in overrides):
        raise UserError("run.dir is the RUN_DIR argument: drop the run.dir override")
    return load_config(path, [*overrides, f"run.dir={run_dir}"])


def evaluate(cfg: Config, checkpoint: Path | None = None) -> dict:
    """{"checkpoint", "step", val_loss (per source dataset too), test_loss (...), with data.stages
    stage_loss_<name> for every stage}: the keys the run's metrics.jsonl uses. `checkpoint`: by
    default run.dir's latest."""
    session = setup(cfg, evaluating=True, checkpoint=checkpoint)
    trainer, step = session.trainer, session.start_step
    stages = trainer.stages
    current = trainer.stage_at(min(step, cfg.train.max_steps) - 1)  # the data the checkpoint last saw (step >= 1)
    losses = trainer.evaluate(current.valid, current.domains)  # train.eval_samples > 0: every stage has one
    if stages[-1].test is not None:
        losses.update(trainer.evaluate(stages[-1].test, stages[-1].test_domains, "test"))
    if len(stages) > 1:
        losses.update({f"stage_loss_{stage.name}": trainer.evaluate(stage.valid, stage.domains)["val_loss"]
                       for stage in stages})
    shutdown()
    return {"checkpoint": str(session.checkpoint), "step": step, **losses}


def check_writable(path: Path) -> None:
    """Refuse, before the evaluation, a --json file that could not be written after it."""
    if not path.parent.is_dir() or not os.access(path.parent, os.W_OK):
        raise UserError(f"--json {path}: directory {path.parent} does not exist or is not writable: create it "
                        "or write elsewhere")


def write_json(path: Path, result: dict) -> None:
    with writing_into(path.parent, "--json"):
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(result, indent=1) + "\n")
        os.replace(tmp, path)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        cfg = run_config(args.run_dir, args.overrides)
        validate(cfg, world_size_from_env())
        if cfg.train.eval_samples == 0:  # (above 0, data.split must give validation documents)
            raise UserError("train.eval_samples=0 leaves nothing to evaluate: set train.eval_samples")
        if args.json and rank_from_env() == 0:  # the rank that writes it
            check_writable(Path(args.json))
        result = evaluate(cfg, None if args.step is None else checkpoint_of_step(Path(args.run_dir), args.step))
    except UserError as e:
        if rank_from_env() == 0:
            print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(EXIT_BAD_INPUT)
    except torch.OutOfMemoryError as e:
        print(out_of_memory_line(rank_from_env(), e, "lower train.micro_batch_size or spread the model over more "
                                 "GPUs"), file=sys.stderr, flush=True)
        sys.exit(EXIT_BAD_INPUT)
    if rank_from_env() != 0:
        return
    print(f"{result['checkpoint']} (step {result['step']}):")
    for key, loss in result.items():
        if key.endswith("loss") or "_loss_" in key:
            print(f"  {key:<24} {loss:.4f}  perplexity {math.exp(min(loss, 700)):.2f}")
    if args.json:
        try:
            write_json(Path(args.json), result)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            sys.exit(EXIT_BAD_INPUT)


if __name__ == "__main__":
    main()
