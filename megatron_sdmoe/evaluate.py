"""sdmoe-eval: the validation and test losses of a run's latest checkpoint (or, with --step, an
earlier one), as its training measured them (with the settings saved with the checkpoint), in any
layout and on the run's own data or other data (`data.*` overrides). Nothing in the run directory
changes (megatron's data index cache aside). With --routes, also which tokens each expert takes on
the validation data, and with --routes-text which experts each token of a text goes to
(moe/routes.py). A run on the built-in sample corpus (the demo) takes other data as data.path,
tokenized with that corpus's tokenizer (SAMPLE_TOKENIZER:
~/.cache/megatron_sdmoe/sample-corpus-v1-py<version>/tokenizer, README Quickstart).

    sdmoe-eval runs/demo
    sdmoe-eval runs/demo --step 100
    sdmoe-eval runs/demo --routes --routes-plot routes.png
    sdmoe-eval runs/demo --routes-text sample.txt
    sdmoe-eval runs/wiki "data.valid_path=[/data/wiki-held-out]" "data.test_path=[/data/books]" train.eval_samples=256
    sdmoe-eval runs/demo "data.path=[/data/wiki]" data.tokenizer=SAMPLE_TOKENIZER
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
import torch.distributed as dist

from megatron_sdmoe.checkpoints import checkpoint_of_step
from megatron_sdmoe.config import Config, load_config
from megatron_sdmoe.errors import (EXIT_BAD_INPUT, ArgumentParser, UserError, exit_bad_input, out_of_memory_line,
                                   positive_int, writing_into)
from megatron_sdmoe.moe.routes import RouteTokens, plot, report_lines, route_text, text_lines
from megatron_sdmoe.runtime import shutdown
from megatron_sdmoe.runtime.distributed import rank_from_env, world_size_from_env
from megatron_sdmoe.train import setup
from megatron_sdmoe.training.checkpoint import latest_checkpoint
from megatron_sdmoe.validation import validate


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(
        prog="sdmoe-eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a run directory sdmoe-train wrote (its config.yaml "
                        "and checkpoints/latest are read)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotted overrides of the run's config: data.* (other data), train.eval_samples, "
                             "train.micro_batch_size, parallel.* (another layout), train.precision")
    parser.add_argument("--step", type=int, help="the checkpoint of this step (sdmoe-checkpoints list RUN_DIR shows "
                        "them) instead of the latest")
    parser.add_argument("--json", metavar="FILE", help="also write the losses as a JSON object to FILE")
    parser.add_argument("--routes", action="store_true", help="also report, per MoE router on the validation "
                        "tokens, each expert's load, the tokens it takes most often (as a share of their rows) and, "
                        "with a blend, each source dataset's lift")
    parser.add_argument("--routes-top", type=positive_int, default=5, metavar="N", help="tokens listed per expert (default 5)")
    parser.add_argument("--routes-min-count", type=positive_int, default=5, metavar="N",
                        help="only tokens seen at least N times are listed (default 5)")
    parser.add_argument("--routes-plot", metavar="FILE.png", help="routers x experts heatmaps of the load and, with a "
                        "blend, each source dataset's lift (implies --routes)")
    parser.add_argument("--routes-text", metavar="FILE", help="also show which experts each token of this text (its "
                        "first data.seq_length tokens) goes to in every router, by routing weight")
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # as sdmoe-train's
    return parser.parse_intermixed_args(argv)  # options and key=value overrides in any order


def run_config(run_dir: str, overrides: list[str], checkpoint: Path | None = None) -> Config:
    """The config saved with `checkpoint` (default the run's latest; before its first, the one the
    run last started with), with `overrides`; run.dir is RUN_DIR. The checkpoint's own: a resume
    may have changed the data settings since, and its losses were measured with its own."""
    checkpoint = checkpoint or latest_checkpoint(Path(run_dir))
    saved = checkpoint / "config.yaml" if checkpoint is not None else None
    path = saved if saved is not None and saved.is_file() else Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise UserError(f"{run_dir} holds no config.yaml: pass a run directory that sdmoe-train wrote")
    if any(item.partition("=")[0] == "run.dir" for item in overrides):
        raise UserError("run.dir is the RUN_DIR argument: drop the run.dir override")
    return load_config(path, [*overrides, f"run.dir={run_dir}"])


def evaluate(cfg: Config, checkpoint: Path | None = None, routes: dict | None = None,
             text: str | None = None, outputs: tuple[tuple[str, Path], ...] = ()) -> dict:
    """{"checkpoint", "step", val_loss (per source dataset too), test_loss (...), with data.stages
    stage_loss_<name> for every stage}: the keys the run's metrics.jsonl uses. `checkpoint`: by
    default run.dir's latest. `routes` ({"top", "min_count"}): also "routes", moe/routes.py's
    report on the validation tokens; `text`: also "text_routes", the routes of its tokens.
    `outputs` ((flag, path) pairs): the files the first rank writes afterwards, refused at start
    if they could not be written."""
    def check_outputs() -> None:
        if dist.get_rank() == 0:  # the rank that writes them; under `agreed`, so every rank stops
            for flag, path in outputs:
                check_writable(flag, path)

    session = setup(cfg, evaluating=True, checkpoint=checkpoint, caller_check=check_outputs)
    trainer, step = session.trainer, session.start_step
    stages = trainer.stages
    current = trainer.stage_at(min(step, cfg.train.max_steps) - 1)  # the data the checkpoint last saw (step >= 1)
    recorder = (RouteTokens(session.engine.module, session.engine.module.vocab_size, len(current.domains))
                if routes else None)
    if recorder:  # the loop hands each micro-batch to its observers
        trainer.observers.append(recorder)
        recorder.recording = True
    losses = trainer.evaluate(current.valid, current.domains)  # train.eval_samples > 0: every stage has one
    if recorder:
        recorder.recording = False
        decode = session.tokenizer.detokenize
        losses["routes"] = recorder.report(current.domains, lambda token: decode([token]), **routes)
    if stages[-1].test is not None:
        losses.update(trainer.evaluate(stages[-1].test, stages[-1].test_domains, "test"))
    if cfg.data.stages:
        losses.update({f"stage_loss_{stage.name}": trainer.evaluate(stage.valid, stage.domains)["val_loss"]
                       for stage in stages})
    if text is not None:
        losses["text_routes"] = text_routes(session, text)
    shutdown()
    return {"checkpoint": str(session.checkpoint), "step": step, **losses}


def text_routes(session, text: str) -> dict:
    """moe/routes.py's route_text of the text's first data.seq_length tokens, and "text_tokens": how
    many the whole text has."""
    every = session.tokenizer.tokenize(text)
    tokens = every[:session.cfg.data.seq_length]
    if not tokens:
        raise UserError("--routes-text holds no token: give a text")
    model = session.engine.module.eval()
    decode = session.tokenizer.detokenize
    return {**route_text(model, torch.tensor(tokens, device=session.layout.device), session.cfg.parallel.tensor,
                         session.tokenizer.eod, lambda token: decode([token])), "text_tokens": len(every)}


def read_text(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"--routes-text {path} cannot be read ({getattr(e, 'strerror', None) or e}): give a UTF-8 "
                        "text file") from None


def check_writable(flag: str, path: Path) -> None:
    """Refuse, before the evaluation, an output file that could not be written after it (on the
    rank that writes it)."""
    if not path.parent.is_dir() or not os.access(path.parent, os.W_OK):
        raise UserError(f"{flag} {path}: directory {path.parent} does not exist or is not writable: create it "
                        "or write elsewhere")
    if path.is_dir():
        raise UserError(f"{flag} {path} is a directory: give a file name")


def check_image_format(path: Path) -> None:
    """Refuse a --routes-plot name that matplotlib writes no image format for (a matter of the
    name alone: every rank sees it before the processes meet)."""
    from matplotlib.figure import Figure

    if path.suffix.lstrip(".").lower() not in Figure().canvas.get_supported_filetypes():
        raise UserError(f"--routes-plot {path}: matplotlib writes no {path.suffix or 'extension-less'} images: "
                        "end the name in .png (or .pdf, .svg)")


def write_outputs(args: argparse.Namespace, result: dict) -> None:
    """--json and --routes-plot, each written whole (a temporary file renamed into place)."""
    for flag, path, write in (("--json", args.json, lambda tmp: tmp.write_text(json.dumps(result, indent=1) + "\n")),
                              ("--routes-plot", args.routes_plot,
                               lambda tmp: plot(result["routes"], tmp, result.get("text_routes")))):
        if path:
            path = Path(path)
            with writing_into(path.parent, flag):
                tmp = path.with_name(f".tmp.{path.name}")  # the suffix kept: matplotlib picks the format by it
                write(tmp)
                os.replace(tmp, path)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        checkpoint = None if args.step is None else checkpoint_of_step(Path(args.run_dir), args.step)
        cfg = run_config(args.run_dir, args.overrides, checkpoint)
        validate(cfg, world_size_from_env())
        if cfg.train.eval_samples == 0:  # (above 0, data.split must give validation documents)
            raise UserError("train.eval_samples=0 leaves nothing to evaluate: set train.eval_samples")
        if args.routes_plot:
            check_image_format(Path(args.routes_plot))
        outputs = tuple((flag, Path(path)) for flag, path in (("--json", args.json), ("--routes-plot", args.routes_plot))
                        if path)
        routes = ({"top": args.routes_top, "min_count": args.routes_min_count}
                  if args.routes or args.routes_plot else None)
        text = read_text(args.routes_text) if args.routes_text else None
        result = evaluate(cfg, checkpoint, routes, text, outputs)
    except UserError as e:
        exit_bad_input(e)
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
    if "routes" in result:
        print("\n".join(["routes on the validation tokens:", *report_lines(result["routes"])]))
    if "text_routes" in result:
        routed, whole = len(result["text_routes"]["tokens"]), result["text_routes"]["text_tokens"]
        cut = f", its first {routed} of {whole} tokens (data.seq_length)" if routed < whole else ""
        print("\n".join([f"routes of {args.routes_text}{cut} (each token's experts, by routing weight):",
                         *text_lines(result["text_routes"])]))
    try:
        write_outputs(args, result)
    except UserError as e:
        exit_bad_input(e)


if __name__ == "__main__":
    main()
