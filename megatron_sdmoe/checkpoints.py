"""sdmoe-checkpoints: a run directory's checkpoints; rolling a run back to one, or branching a new
run from one.

    sdmoe-checkpoints list RUN_DIR                   each checkpoint: step, layout, size, the loss logged there
                                                     (and those rolled back, and the training job running
                                                     there, if one is: its last logged step and time left)
    sdmoe-checkpoints rollback RUN_DIR STEP          make step STEP the one the next start resumes from
    sdmoe-checkpoints branch RUN_DIR STEP NEW_DIR    a new run directory that resumes from step STEP

After a loss spike: roll back to a checkpoint before it, then start again with the batches that
led to it left out, e.g. `sdmoe-train RUN_DIR/config.yaml train.skip_batches=[1201-1260]`.
A rollback points checkpoints/latest at step STEP and moves the later checkpoints into
checkpoints/rolled_back/<time>/ (delete that when it is no longer needed); the next start moves
the metrics logged past STEP to metrics_replaced.jsonl. It is refused while a training job runs in
RUN_DIR (its run.lock).

A branch starts another run from a checkpoint and leaves RUN_DIR as it is: a warmup-stable-decay
run's decay from a step of its stable phase, or an ablation from a shared start, e.g.
`sdmoe-train NEW_DIR/config.yaml train.max_steps=6000 train.decay_fraction=0.1667`. NEW_DIR
gets the checkpoint (its files hard-linked where the filesystem allows: checkpoints are never
changed in place, so neither run can alter the other's), the config it was saved with (its run.dir
NEW_DIR), the metrics lines and TensorBoard events up to STEP and the stage matrix.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

from megatron_sdmoe.config import load_config, save_config, stage_ends, stage_name
from megatron_sdmoe.errors import ArgumentParser, UserError, exit_bad_input, writing_into
from megatron_sdmoe.runtime.run_lock import check_free, running_job
from megatron_sdmoe.training.checkpoint import (LATEST, check_intact, checkpoint_root, complete_checkpoints,
                                                 latest_checkpoint, layout_words, point_latest, read_meta)
from megatron_sdmoe.training.metrics import logged_step
from megatron_sdmoe.training.stage_matrix import StageMatrix


ROLLED_BACK = "rolled_back"  # checkpoints/rolled_back/<time>/: the checkpoints a rollback moved aside


def _step(path: Path) -> int:
    return int(path.name.removeprefix("step_"))


def saved_checkpoints(run_dir: Path) -> list[Path]:
    """The run's complete checkpoints, by step; refused when it has none."""
    if latest_checkpoint(run_dir) is None:
        raise UserError(f"{run_dir} holds no checkpoint ({checkpoint_root(run_dir) / LATEST} does not exist): give "
                        "the run.dir of a run that has saved one")
    return complete_checkpoints(run_dir)


def _rows(path: Path) -> list[dict]:
    """The lines of a metrics file, a line cut short by a crash left out."""
    lines = path.read_text().splitlines() if path.exists() else []
    return [json.loads(line) for line in lines if logged_step(line) != float("inf")]


def _logged(run_dir: Path) -> dict[int, dict]:
    """The metrics line of each logged step (the last, where a step was logged twice)."""
    return {row["step"]: row for row in _rows(run_dir / "metrics.jsonl")}


def _size_gib(directory: Path) -> float:
    return sum(f.stat().st_size for f in directory.rglob("*") if f.is_file()) / 2**30


def describe(run_dir: Path) -> list[str]:
    checkpoints, latest, logged = saved_checkpoints(run_dir), latest_checkpoint(run_dir), _logged(run_dir)
    lines = [f"{'step':>8}  {'layout':<29}  {'GiB':>7}  {'loss':>7}  {'val loss':>8}"]
    for path in checkpoints:
        layout = read_meta(path)["layout"]
        row = logged.get(_step(path), {})
        lines.append(f"{_step(path):>8}  {layout_words(layout):<29}  {_size_gib(path):>7.3f}  "
                     f"{_number(row.get('loss')):>7}  {_number(row.get('val_loss')):>8}"
                     + ("  <- latest" if path == latest else ""))
    for aside in sorted((checkpoint_root(run_dir) / ROLLED_BACK).glob("*")):
        steps = sorted(_step(p) for p in aside.glob("step_*"))
        lines.append(f"rolled back: step(s) {', '.join(map(str, steps))} in {aside} (move them into "
                     f"{checkpoint_root(run_dir)} and point {LATEST} at one to return to it)")
    job = running_job(run_dir)
    if job:
        lines.append(f"training now: {job}{_progress(run_dir)}")
    return lines


def _progress(run_dir: Path) -> str:
    """The running job's last logged step of train.max_steps, when it was logged, and the time left
    at that step's speed (its training time alone: evaluations and checkpoints add to it)."""
    rows = _rows(run_dir / "metrics.jsonl")
    if not rows:
        return ""
    last, cfg = rows[-1], load_config(run_dir / "config.yaml")  # the config the job started with
    seconds = (cfg.train.max_steps - last["step"]) * last["global_batch"] * cfg.data.seq_length / last["tokens_per_s"]
    logged = time.strftime("%H:%M:%S", time.localtime((run_dir / "metrics.jsonl").stat().st_mtime))
    return (f"; step {last['step']} of {cfg.train.max_steps} logged at {logged}, about {_duration(seconds)} to go at "
            f"{last['tokens_per_s']:,.0f} tokens/s")


def _duration(seconds: float) -> str:
    minutes = round(seconds / 60)
    if minutes < 1:
        return f"{seconds:.0f} s"
    return f"{minutes // 60} h {minutes % 60} min" if minutes >= 60 else f"{minutes} min"


def _number(value) -> str:
    return "-" if value is None else f"{value:.4f}"


def checkpoint_of_step(run_dir: Path, step: int) -> Path:
    """The complete checkpoint of step `step` in `run_dir` (its meta.json read)."""
    checkpoints = saved_checkpoints(run_dir)
    found = next((p for p in checkpoints if _step(p) == step), None)
    if found is None:
        raise UserError(f"{run_dir} has no complete checkpoint of step {step}: choose one of "
                        f"{', '.join(str(_step(p)) for p in checkpoints) or 'none'} (sdmoe-checkpoints list {run_dir})")
    read_meta(found)
    return found


def rollback(run_dir: Path, step: int) -> str:
    """Point `latest` at step `step` and move the later checkpoints aside; returns what was done."""
    checkpoints, latest = saved_checkpoints(run_dir), latest_checkpoint(run_dir)
    target = checkpoint_of_step(run_dir, step)
    check_intact(target, contents=False)  # not made `latest` when a rank file is cut short (training reads the rest)
    check_free(run_dir, "roll back once it has ended (or stop it: it saves a checkpoint on SIGUSR1)")
    root = checkpoint_root(run_dir)
    if target == latest and (root / LATEST).exists():
        return f"{LATEST} already names {target.name}: nothing to do"
    if latest in checkpoints and _step(latest) < step:
        raise UserError(f"step {step} is later than the latest checkpoint ({latest.name}): a rollback goes back to an "
                        "earlier step; point checkpoints/latest at it by hand if that is meant")
    later = [p for p in root.glob("step_*") if _step(p) > step]
    # `latest` first, atomically: if the moves below are cut short, the run still resumes from `step`
    # (and a save does not count the later checkpoints left in place: save_checkpoint's retention).
    aside = root / ROLLED_BACK / time.strftime("%Y%m%d-%H%M%S")
    with writing_into(run_dir):
        point_latest(root, target.name)
        for path in later:
            aside.mkdir(parents=True, exist_ok=True)
            path.rename(aside / path.name)
    moved = (f"; moved {len(later)} later checkpoint(s) (steps {', '.join(str(_step(p)) for p in sorted(later))}) "
             f"to {aside}: delete it when no longer needed") if later else ""
    return (f"{LATEST} now names {target.name}{moved}. The next start resumes from step {step}; add "
            "train.skip_batches=[FIRST-LAST] to leave out the batches that led to the spike")


def branch(run_dir: Path, step: int, new_dir: Path) -> str:
    """A new run directory `new_dir` that resumes from step `step` of `run_dir`; returns what was done.
    It is made whole beside `new_dir`, then renamed into place: a failure leaves nothing."""
    source = checkpoint_of_step(run_dir, step)
    check_intact(source, contents=False)  # not branched when a rank file is cut short (training reads the rest)
    if new_dir.exists() and (not new_dir.is_dir() or any(new_dir.iterdir())):
        raise UserError(f"{new_dir} exists and is not an empty directory: branch into a new directory")
    # inside this run or another one: its checkpoints and rollbacks would replace the branch's files
    host = next((d for d in [new_dir.resolve(), *new_dir.resolve().parents]
                 if d == run_dir.resolve() or (d / "config.yaml").is_file() and checkpoint_root(d).is_dir()), None)
    if host is not None:
        raise UserError(f"{new_dir} lies inside the run directory {host}, whose checkpoints and rollbacks would "
                        "replace its files: branch into a directory outside it")
    tmp = new_dir.with_name(f".{new_dir.name}.tmp")
    rows = [row for row in _rows(run_dir / "metrics.jsonl") if row["step"] <= step]
    try:
        with writing_into(new_dir.parent, "NEW_DIR's parent"):
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(source, checkpoint_root(tmp) / source.name, copy_function=_link_or_copy)
            (checkpoint_root(tmp) / LATEST).write_text(source.name)
            config = load_config(source / "config.yaml")  # as the checkpoint saved it, training into new_dir
            config.run.dir = str(new_dir.resolve())  # (reused as is, it would train run_dir on)
            save_config(config, tmp / "config.yaml")
            for name in ("stages.json", "stages.png"):  # the stage matrix, kept across restarts
                if (run_dir / name).exists():
                    shutil.copy2(run_dir / name, tmp / name)
            if config.data.stages:  # its rows of the stages that ended by STEP
                names = [stage_name(config, i) for i in range(len(config.data.stages))]
                StageMatrix(tmp, names, enabled=True).rewind(step, stage_ends(config))
            (tmp / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
            _copy_tensorboard(run_dir / "tb", tmp / "tb", step)
            os.replace(tmp, new_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return (f"{new_dir} resumes from step {step} of {run_dir} ({source.name}; {len(rows)} metrics lines and the "
            "TensorBoard events up to it): "
            f"sdmoe-train {new_dir / 'config.yaml'} [key=value ...]")


def _copy_tensorboard(source: Path, target: Path, step: int) -> None:
    """The run's TensorBoard events up to `step`, in one new event file: copied, not linked, since
    the run goes on appending to its own files. The markers of its restarts (file_version events at
    a purge step) come along, so TensorBoard hides the same abandoned steps it hides in the run."""
    from tensorboard.backend.event_processing.event_file_loader import LegacyEventFileLoader
    from torch.utils.tensorboard.writer import FileWriter

    files = sorted(source.glob("events.out.tfevents.*"))  # by creation time, as TensorBoard reads them
    if not files:
        return
    writer = FileWriter(str(target))  # writes its own file_version header
    for file in files:
        for event in LegacyEventFileLoader(str(file)).Load():  # as written (no conversion)
            if event.step <= step and not (event.HasField("file_version") and event.step == 0):
                writer.add_event(event)
    writer.close()
    # TensorBoard reads a directory's event files in name order (their creation second, then host and
    # pid): under the run's first file's name, the copy comes before whatever the branch writes.
    next(target.glob("events.out.tfevents.*")).rename(target / files[0].name)


def _link_or_copy(source: str, target: str) -> None:
    """A hard link (no copy of the data), or a copy where the filesystem cannot link (another device)."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(prog="sdmoe-checkpoints", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    list_cmd = commands.add_parser("list", help="each checkpoint: step, layout, size, the loss logged there")
    list_cmd.add_argument("run_dir", type=Path, help="the run directory (run.dir)")
    rollback_cmd = commands.add_parser("rollback", help="make an earlier checkpoint the one the next start resumes "
                                       "from")
    rollback_cmd.add_argument("run_dir", type=Path, help="the run directory (run.dir)")
    rollback_cmd.add_argument("step", type=int, help="the step of the checkpoint to resume from")
    branch_cmd = commands.add_parser("branch", help="a new run directory that resumes from a checkpoint of this run")
    branch_cmd.add_argument("run_dir", type=Path, help="the run directory (run.dir) to branch from")
    branch_cmd.add_argument("step", type=int, help="the step of the checkpoint to start from")
    branch_cmd.add_argument("new_dir", type=Path, help="the new run directory (created; must not hold anything)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        if args.command == "list":
            print("\n".join(describe(args.run_dir)))
        elif args.command == "rollback":
            print(rollback(args.run_dir, args.step))
        else:
            print(branch(args.run_dir, args.step, args.new_dir))
    except UserError as e:
        exit_bad_input(e)


if __name__ == "__main__":
    main()
