"""sdmoe-train: pretrain a MoE model from a config file.

    sdmoe-train configs/tiny-qwen3-moe.yaml run.dir=runs/demo train.max_steps=50
    torchrun --nproc-per-node 2 -m megatron_sdmoe.train configs/tiny-qwen3-moe.yaml parallel.expert=2

Starting again in the same run.dir resumes from its checkpoints/latest.
"""
from __future__ import annotations

import argparse
import errno
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from megatron_sdmoe.config import Config, grad_accumulation_steps, load_config, recompute_label, save_config
from megatron_sdmoe.data.datasets import parse_blend
from megatron_sdmoe.data.indexed import check_token_ids
from megatron_sdmoe.data.sample_corpus import configured_tokenizer, ensure_sample_corpus
from megatron_sdmoe.data.tokenizer import Tokenizer
from megatron_sdmoe.errors import (EXIT_BAD_INPUT, ArgumentParser, UserError, exit_bad_input, out_of_host_memory,
                                   out_of_memory_line, writing_into)
from megatron_sdmoe.models import build_model, padded_vocab_size
from megatron_sdmoe.preflight import check_files
from megatron_sdmoe.runtime import Layout, init_distributed, seed_everything, shutdown
from megatron_sdmoe.runtime.agreement import agreed, check_shared_directory
from megatron_sdmoe.runtime.distributed import rank_from_env, world_size_from_env
from megatron_sdmoe.runtime.preemption import EXIT_REQUEUE, stop_signals_caught
from megatron_sdmoe.runtime.provenance import record_start
from megatron_sdmoe.runtime.run_lock import RunLock
from megatron_sdmoe.training.checkpoint import (latest_checkpoint, load_checkpoint, relaid_from, saved_step,
                                                saved_trainer_state)
from megatron_sdmoe.training.engine import build_engine
from megatron_sdmoe.training.loop import Diverged, Trainer
from megatron_sdmoe.training.metrics import MetricsLogger, moe_layer_labels
from megatron_sdmoe.training.resume_checks import ORDER_SETTINGS, changed_settings, check_vocabulary
from megatron_sdmoe.training.schedule import schedule_notes
from megatron_sdmoe.training.stages import build_stages, evaluated_on_training_data, stage_blends
from megatron_sdmoe.validation import idle_settings, validate

EXIT_DIVERGED = 4  # stopped after too many non-finite steps, with a checkpoint of the last good weights
EXIT_INTERRUPTED = 130  # Ctrl-C that did not wait for a checkpoint (128 + SIGINT, as shells report it)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(
        prog="sdmoe-train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="YAML config file (see configs/)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotted config overrides, e.g. train.lr=1e-3 parallel.expert=2")
    # The deepspeed launcher (and torch.distributed.launch) pass each worker its local rank as an
    # argument; the LOCAL_RANK it also sets in the environment is what the runtime reads.
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def prepare_run_dir(cfg: Config, is_main: bool, lock: RunLock | None = None) -> Path:
    """run.dir (and data.cache_dir), each checked to be one directory on every rank; rank 0 takes
    `lock`, if given, before anything is written there (the data index cache)."""
    run_dir = Path(cfg.run.dir)
    if cfg.data.cache_dir:  # rank 0 writes the dataset index cache, the other ranks read it; first, so
        cache_dir = Path(cfg.data.cache_dir)  # that a bad one leaves no run.dir behind
        agreed(lambda: writable_directory(cache_dir, "data.cache_dir") if is_main else None)
        check_shared_directory(cache_dir, "data.cache_dir")
    check_shared_directory(run_dir, "run.dir")
    if lock:
        take_lock(lock, is_main, lambda: lock.holder is None)
    return run_dir


def take_lock(lock: RunLock, is_main: bool, wanted: Callable[[], bool]) -> None:
    """Rank 0 takes `lock` if `wanted()` says so (a collective: every rank calls it)."""
    taken_over = agreed(lambda: lock.acquire() if is_main and wanted() else None)
    if taken_over:
        print(taken_over, flush=True)


def writable_directory(directory: Path, setting: str) -> None:
    """`directory` (the value of `setting`) made if need be, refused if it cannot be written."""
    with writing_into(directory, setting):
        directory.mkdir(parents=True, exist_ok=True)
        if not os.access(directory, os.W_OK):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))


def write_config(cfg: Config, run_dir: Path, is_main: bool) -> None:
    """The resolved config.yaml, written once the data, the model and the weights it starts from
    have passed (so bad input leaves a run's config.yaml as it was)."""
    def write() -> None:
        with writing_into(run_dir):
            tmp = run_dir / ".config.yaml.tmp"
            save_config(cfg, tmp)
            os.replace(tmp, run_dir / "config.yaml")
    agreed(lambda: write() if is_main else None)


def checked_tokenizer(cfg: Config, checkpoint: Path | None) -> tuple[Tokenizer, int]:
    """The tokenizer and the vocabulary size (before padding), refused if the model or the
    checkpoint it starts from has fewer rows than it needs, or the data holds ids past it."""
    tokenizer = configured_tokenizer(cfg.data.tokenizer)
    vocab = cfg.model.vocab_size or tokenizer.vocab_size
    if vocab < tokenizer.vocab_size:
        raise UserError(f"model.vocab_size={vocab} is smaller than the tokenizer's {tokenizer.vocab_size} tokens: "
                        "raise it or leave it empty")
    check_vocabulary(checkpoint, padded_vocab_size(vocab, cfg))
    for stage in stage_blends(cfg):
        blends = (stage.path, stage.valid_path, stage.test_path)
        for prefix in {prefix for blend in blends if blend for prefix in parse_blend(blend)[0]}:
            check_token_ids(prefix, vocab)
    return tokenizer, vocab


@dataclass
class Session:
    """Everything a training run holds once set up."""

    cfg: Config
    layout: Layout
    run_dir: Path
    engine: object
    trainer: Trainer
    tokenizer: Tokenizer
    checkpoint: Path | None  # the one it started from
    start_step: int
    load_seconds: float  # the checkpoint's load (0 without one)


def setup(cfg: Config, evaluating: bool = False, checkpoint: Path | None = None,
          lock: RunLock | None = None, caller_check: Callable[[], None] | None = None) -> Session:
    """Config -> process groups, run directory, data, model, DeepSpeed engine, restored state from
    `checkpoint` (by default run.dir's latest). `evaluating` (sdmoe-eval): a checkpoint is required,
    and nothing is written into run.dir (no config.yaml, starts.jsonl, metrics or TensorBoard; the
    data index cache aside). `lock` (training): run.dir's lock, taken before the checkpoint to
    resume from is read (an existing run.dir), or once the checks have passed, before anything is
    written (a new one); the caller releases it. `caller_check`: the caller's own start-up
    check (sdmoe-eval's output files), run before the file checks."""
    par, tr = cfg.parallel, cfg.train
    layout = init_distributed(par.tensor, par.expert, par.expert_tensor)
    if lock:  # an existing run.dir's lock before `latest` is read: a rollback is refused while this start checks
        take_lock(lock, layout.is_main, lambda: Path(cfg.run.dir).is_dir())  # a new one's after the checks
    checkpoint = checkpoint or latest_checkpoint(Path(cfg.run.dir))
    # Until the run directory is written, bad input that one rank alone sees (other nodes, other
    # files) is every rank's error: see runtime/agreement.py.
    def start_checks() -> None:
        if caller_check:
            caller_check()
        check_files(cfg, layout.world_size, checkpoint, need_checkpoint=evaluating)

    if not cfg.data.path and not cfg.data.stages:  # the built-in corpus (checked with the rest): one rank builds it
        if layout.is_main:
            ensure_sample_corpus()
        dist.barrier()
    agreed(start_checks)
    tokenizer, vocab = agreed(lambda: checked_tokenizer(cfg, checkpoint))
    run_dir = prepare_run_dir(cfg, layout.is_main, lock=lock)
    stages = build_stages(cfg, tokenizer)
    if layout.is_main and not evaluating:
        for note in evaluated_on_training_data(cfg) + schedule_notes(cfg) + idle_settings(cfg):
            print(note, flush=True)

    use_bf16 = tr.precision == "bf16" or (tr.precision == "auto" and torch.cuda.is_available())
    dtype = torch.bfloat16 if use_bf16 else torch.float32
    seed_everything(tr.seed)
    # a checkpoint (vetted by check_resumable) replaces the initial weights: they are not drawn
    model = build_model(cfg, vocab, dtype, resuming=checkpoint is not None).to(layout.device)
    engine = build_engine(model, cfg, layout, grad_accumulation_steps(cfg, layout.world_size), dtype)
    relaid, started = relaid_from(checkpoint, layout), time.perf_counter()
    start_step = load_checkpoint(checkpoint, engine, layout, model_only=evaluating)
    load_seconds = time.perf_counter() - started
    if not evaluating:
        write_config(cfg, run_dir, layout.is_main)
        record_start(run_dir, layout, start_step, dtype)
    metrics = MetricsLogger(run_dir, layout.is_main and not evaluating, start_step, moe_layer_labels(model))
    if layout.is_main:
        params = sum(p.numel() for p in model.parameters())
        changed = changed_settings(checkpoint, cfg)
        print(f"model {cfg.model.preset}: {params / 1e6:.2f}M parameters on rank 0 | world {layout.world_size} "
              f"(TP {par.tensor}, EP {par.expert}, DP {layout.data_parallel}) | ZeRO-{par.zero_stage} | {dtype} | "
              + (f"recompute: {recompute_label(cfg)} | " if cfg.train.recompute != "none" else "")
              + (f"evaluating step {start_step}" if evaluating else
                 f"resuming from step {start_step}" if start_step else "starting at step 0")
              + ((f" (saved in {relaid}: re-cut in {load_seconds:.1f} s)" if relaid
                  else f" (loaded in {load_seconds:.1f} s)") if start_step else "")
              + (f" with changed settings: {', '.join(sorted(changed))}" if changed else ""), flush=True)
        reordered = [key for key in ORDER_SETTINGS if any(change.startswith(f"{key}:") for change in changed)]
        if reordered:
            print(f"note: {' and '.join(reordered)} changed: the samples come in another order from here on, so "
                  "the steps to come may repeat or skip samples the run has seen", flush=True)
    trainer = Trainer(cfg, layout, engine, stages, run_dir, metrics, saved_trainer_state(checkpoint))
    return Session(cfg, layout, run_dir, engine, trainer, tokenizer, checkpoint, start_step, load_seconds)


def train(cfg: Config) -> None:
    """Train; exits with EXIT_REQUEUE after a checkpoint when a signal or the time budget stops it."""
    with RunLock(Path(cfg.run.dir)) as lock:  # released however training ends (kill -9 aside: run_lock.py)
        session = setup(cfg, lock=lock)
        try:
            stopped = session.trainer.run(session.start_step, session.load_seconds)
        finally:  # also when training diverged
            session.trainer.metrics.close()
    if session.layout.is_main:
        checkpoint, tr = latest_checkpoint(session.run_dir), cfg.train
        step = saved_step(checkpoint)
        ended = (f"stopped early ({stopped}), requeue to resume" if stopped else
                 f"stopped at step {step} of {tr.max_steps} (train.exit_interval), start again to go on"
                 if tr.exit_interval and step < tr.max_steps else "done")
        print(f"{ended}. TensorBoard: tensorboard --logdir {session.run_dir / 'tb'} | checkpoint: "
              f"{checkpoint or 'none'} | metrics: {session.run_dir / 'metrics.jsonl'}", flush=True)
    shutdown()
    if stopped:
        sys.exit(EXIT_REQUEUE)


def main(argv: list[str] | None = None) -> None:
    with stop_signals_caught():
        _main(argv)


def _main(argv: list[str] | None) -> None:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        validate(cfg, world_size_from_env())
        train(cfg)
    except UserError as e:
        exit_bad_input(e)
    except Diverged as e:
        if rank_from_env() == 0:
            print(f"error: training diverged: {e}", file=sys.stderr, flush=True)
        sys.exit(EXIT_DIVERGED)
    except KeyboardInterrupt:  # a second Ctrl-C in training (the first stops with a checkpoint), or one before
        if rank_from_env() == 0:
            print("interrupted: stopped without a checkpoint; starting again resumes from the last one",
                  file=sys.stderr, flush=True)
        sys.exit(EXIT_INTERRUPTED)
    except torch.OutOfMemoryError as e:  # one rank's: it says so itself (the launcher ends the others)
        print(out_of_memory_line(rank_from_env(), e, "lower train.micro_batch_size, set train.recompute=selective "
                                 "(or full), or spread the model over more GPUs (sdmoe-estimate CONFIG --gpus N says "
                                 "what fits)"), file=sys.stderr, flush=True)
        sys.exit(EXIT_BAD_INPUT)
    except (MemoryError, RuntimeError) as e:
        if not out_of_host_memory(e):
            raise
        print(out_of_memory_line(rank_from_env(), e, "each rank builds its part of the model (and the data's index) in "
                                 "host memory: give the ranks more memory or fewer per node, or shrink the model "
                                 "(sdmoe-estimate CONFIG says how large it is)", memory="host"), file=sys.stderr,
              flush=True)
        sys.exit(EXIT_BAD_INPUT)


if __name__ == "__main__":
    main()
