"""Recovering from a loss spike: `sdmoe-checkpoints rollback` to an earlier checkpoint, then
`train.skip_batches` leaves out the batches that led to it. A skipped batch is a step without an
update (weights, Adam moments and fp32 masters stay bit for bit; the LR schedule and the data move
on, SD-MoE's bases refresh on time), and a rolled-back run that skips equals a run that skipped
from the start. The logs then hold the history that leads to the checkpoint: metrics.jsonl and
TensorBoard each step once, what the rollback replaced in metrics_replaced.jsonl. A branch (a new
run directory from a checkpoint, its files hard-linked, its logs up to there, its config training
into it) continues as the run it came from did."""
import json
import shutil
import subprocess
import sys

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import CONFIG, REPO, SMALL, launch, launch_module, metrics, rank_file, run_command, run_env

# SD-MoE refreshing its bases every 2 steps: step 3's refresh falls in the skipped batches 3-4.
RUN = ["train.max_steps=6", "train.save_interval=2", "moe.variant=sdmoe", "sdmoe.refresh_interval=2",
       "sdmoe.rank=4"]
SKIP = "train.skip_batches=[3-4]"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """6 steps straight, and 6 steps with batches 3-4 skipped from the start."""
    root = tmp_path_factory.mktemp("runs")
    launch(root / "straight", 1, *RUN)
    launch(root / "skipping", 1, *RUN, SKIP)
    return root


def tensors(tree, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor of a nested state dict, by dotted path."""
    if torch.is_tensor(tree):
        return {prefix: tree}
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, (list, tuple)) else ()
    return {path: t for key, value in items for path, t in tensors(value, f"{prefix}.{key}").items()}


def test_skipped_batches_update_nothing_while_the_schedule_and_data_move_on(runs):
    straight, skipping = metrics(runs / "straight"), metrics(runs / "skipping")
    assert [r["step"] for r in skipping] == [1, 2, 5, 6]
    assert [r["loss"] for r in skipping[:2]] == [r["loss"] for r in straight[:2]]
    # the LR of steps 5 and 6 is the straight run's: the schedule moved on over the skipped steps
    assert [r["lr"] for r in skipping[2:]] == [r["lr"] for r in straight[4:]]
    # step 5 trains on batch 5: from the step-2 weights, batch 3 would give the straight run's step-3 loss
    assert skipping[2]["loss"] != straight[2]["loss"]

    # the checkpoint in the skipped range holds the step-2 state bit for bit: weights, fp32 masters,
    # Adam moments and step count; only SD-MoE's bases were refreshed at step 3, as in the straight
    # run, from the same weights (the straight run's step-3 refresh saw the step-2 weights too)
    before, after = (tensors({key: rank_file(runs / "skipping", step)[key] for key in ("model", "optimizer")})
                     for step in (2, 4))
    assert before.keys() == after.keys()
    bases = [k for k in before if k.rsplit(".", 1)[-1] in ("q_fc1", "v_fc1", "q_fc2", "v_fc2")]
    assert len(bases) == 8
    for key in before.keys() - set(bases):
        assert torch.equal(before[key], after[key]), key
    straight_bases = rank_file(runs / "straight", 4)["model"]
    for key in bases:
        assert not torch.equal(before[key], after[key]), key
        assert torch.equal(after[key], straight_bases[key.removeprefix(".model.")]), key


def test_rollback_then_skip_equals_skipping_from_the_start(runs, tmp_path):
    run_dir = tmp_path / "run"
    launch(run_dir, 1, *RUN)  # the straight run, which "spiked" after step 2
    logged = metrics(run_dir)
    listed = run_command("megatron_sdmoe.checkpoints", "list", run_dir)
    assert listed.returncode == 0, listed.stderr
    rows = listed.stdout.splitlines()[1:]
    assert [row.split()[0] for row in rows] == ["2", "4", "6"] and rows[-1].endswith("<- latest")
    assert f"{logged[3]['loss']:.4f}" in rows[1]  # the loss logged at step 4

    done = run_command("megatron_sdmoe.checkpoints", "rollback", run_dir, 2)
    assert done.returncode == 0, done.stderr
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_00000002"
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step_*")) == ["step_00000002"]
    aside = list((run_dir / "checkpoints" / "rolled_back").iterdir())
    assert len(aside) == 1 and sorted(p.name for p in aside[0].iterdir()) == ["step_00000004", "step_00000006"]
    assert str(aside[0]) in done.stdout
    listed = run_command("megatron_sdmoe.checkpoints", "list", run_dir).stdout.splitlines()
    assert listed[-1].startswith(f"rolled back: step(s) 4, 6 in {aside[0]} (move them into ")

    proc = launch(run_dir, 1, *RUN, SKIP)
    assert "resuming from step 2" in proc.stdout and "steps 3-4: batches skipped" in proc.stdout
    resumed, reference = metrics(run_dir), metrics(runs / "skipping")
    assert [r["step"] for r in resumed] == [1, 2, 5, 6]
    for got, want in zip(resumed, reference, strict=True):
        for key in ("loss", "aux_loss", "grad_norm", "lr"):
            assert got[key] == want[key], (got["step"], key)
    replaced = [json.loads(line) for line in (run_dir / "metrics_replaced.jsonl").read_text().splitlines()]
    assert replaced == logged[2:]  # the abandoned steps 3-6, as logged

    assert tensorboard_losses(run_dir) == [(r["step"], pytest.approx(r["loss"], rel=1e-6)) for r in resumed]


def tensorboard_losses(run_dir) -> list[tuple[int, float]]:
    """(step, loss) as TensorBoard shows the run."""
    events = EventAccumulator(str(run_dir / "tb"))
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars("train/loss")]


def test_retention_keeps_the_new_checkpoint_beside_later_ones(runs, tmp_path):
    """`latest` pointed back by hand, the later checkpoints left in place: with
    train.keep_checkpoints=1 the resumed run's saves replace the older ones, never themselves."""
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(runs / "straight", run_dir)
    (run_dir / "checkpoints" / "latest").write_text("step_00000002")
    launch(run_dir, 1, *RUN, "train.max_steps=4", "train.keep_checkpoints=1")
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_00000004"
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step_*")) == ["step_00000004", "step_00000006"]
    assert [r["step"] for r in metrics(run_dir)] == [1, 2, 3, 4]


def test_branch_continues_the_run_it_came_from_and_leaves_it_alone(runs, tmp_path):
    straight = runs / "straight"
    before = {p: p.stat().st_mtime_ns for p in straight.rglob("*") if p.is_file()}
    branch = tmp_path / "branch"
    done = run_command("megatron_sdmoe.checkpoints", "branch", straight, 2, branch)
    assert done.returncode == 0, done.stderr
    saved, linked = straight / "checkpoints" / "step_00000002", branch / "checkpoints" / "step_00000002"
    for path in saved.iterdir():  # hard links, not copies
        assert (linked / path.name).stat().st_ino == path.stat().st_ino
    assert [r["step"] for r in metrics(branch)] == [1, 2]
    assert tensorboard_losses(branch) == tensorboard_losses(straight)[:2]  # the history up to the branch
    proc = launch_module("megatron_sdmoe.train", [str(branch / "config.yaml")], 1)  # its config trains the branch
    assert "resuming from step 2" in proc.stdout
    assert [(r["step"], r["loss"], r["lr"]) for r in metrics(branch)] == \
        [(r["step"], r["loss"], r["lr"]) for r in metrics(straight)]
    assert tensorboard_losses(branch) == [(r["step"], pytest.approx(r["loss"], rel=1e-6)) for r in metrics(branch)]
    assert {p: p.stat().st_mtime_ns for p in straight.rglob("*") if p.is_file()} == before
    refused = run_command("megatron_sdmoe.checkpoints", "branch", straight, 4, branch)
    assert refused.returncode == 2 and f"{branch} exists and is not an empty directory" in refused.stderr
    # the next save of step 5 would replace the first; a rollback of the branch would move the second aside
    for inside, host in ((straight / "checkpoints" / "step_00000005", straight),
                         (branch / "checkpoints" / "step_00000099", branch)):
        refused = run_command("megatron_sdmoe.checkpoints", "branch", straight, 4, inside)
        assert refused.returncode == 2 and refused.stderr == (
            f"error: {inside} lies inside the run directory {host}, whose checkpoints and rollbacks would replace "
            "its files: branch into a directory outside it\n")
    assert {p: p.stat().st_mtime_ns for p in straight.rglob("*") if p.is_file()} == before


def test_a_rollback_while_a_start_checks_its_checkpoint_is_refused(runs, tmp_path):
    """A start reads `latest`, then checks the checkpoint's files (minutes at scale): a rollback in
    between moved the checkpoint aside under it (a traceback). The start now holds run.lock from
    before it reads `latest`, so the rollback is refused, and the start goes on from step 6."""
    run = tmp_path / "run"
    shutil.copytree(runs / "straight", run)
    code = f"""
import subprocess, sys
from pathlib import Path
from megatron_sdmoe.config import load_config
from megatron_sdmoe.runtime.run_lock import RunLock
import megatron_sdmoe.train as train
cfg = load_config({str(CONFIG)!r}, {[*SMALL, *RUN, f"run.dir={run}"]!r})
checks = train.check_files
def checked_then_rolled_back(*args, **kwargs):
    checks(*args, **kwargs)
    rollback = [sys.executable, "-m", "megatron_sdmoe.checkpoints", "rollback", cfg.run.dir, "2"]
    print("rollback:", subprocess.run(rollback, capture_output=True, text=True).stderr.strip())
train.check_files = checked_then_rolled_back
with RunLock(Path(cfg.run.dir)) as lock:
    print("resumed from", train.setup(cfg, lock=lock).start_step)
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=run_env(), capture_output=True, text=True,
                          timeout=600)
    lines = proc.stdout.splitlines()
    assert f"rollback: error: run.dir {run} is in use by the training job on host " in proc.stdout, \
        proc.stdout + proc.stderr[-2000:]
    assert lines[-1] == "resumed from 6" and (run / "checkpoints" / "latest").read_text().strip() == "step_00000006"


@pytest.mark.parametrize("args, message", [
    (["rollback", "{run}", "3"], "has no complete checkpoint of step 3: choose one of 2, 4, 6"),
    (["rollback", "{empty}", "2"], "holds no checkpoint"),
    (["list", "{empty}"], "holds no checkpoint"),
])
def test_rollback_refuses_bad_input(args, message, runs, tmp_path):
    import shutil

    shutil.copytree(runs / "straight" / "checkpoints", tmp_path / "run" / "checkpoints")
    (tmp_path / "empty").mkdir()
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    proc = run_command("megatron_sdmoe.checkpoints", *[a.format(run=tmp_path / "run", empty=tmp_path / "empty")
                                                       for a in args])
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and message in proc.stderr, proc.stderr
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before


def test_rollback_to_a_later_step_is_refused(runs, tmp_path):
    import shutil

    shutil.copytree(runs / "straight" / "checkpoints", tmp_path / "checkpoints")
    (tmp_path / "checkpoints" / "latest").write_text("step_00000002")
    proc = run_command("megatron_sdmoe.checkpoints", "rollback", tmp_path, 4)
    assert proc.returncode == 2 and "later than the latest checkpoint (step_00000002)" in proc.stderr
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step_00000002"
