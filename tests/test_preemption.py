"""Surviving preemption and crashes: SIGUSR1 / SIGTERM / SIGINT and the time budget (room kept for a
step and a save) stop after a step with a checkpoint and the requeue exit code; kill -9 at any step
loses nothing but the steps since the last checkpoint (its lock taken over on restart); a save
killed half-way leaves the previous checkpoint usable; retention keeps N; a second job in a running
run.dir is refused; a save that one rank cannot write stops every rank with one line, as running out
of GPU memory does the rank it happens on. Every resumed run reaches the uninterrupted run's losses
exactly."""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from conftest import (CONFIG, DISTRIBUTED_ENV, REPO, SMALL, launch, log_path, metrics, rank_file, run_command,
                      wait_for_step)

from megatron_sdmoe.runtime.preemption import EXIT_REQUEUE
from megatron_sdmoe.runtime.run_lock import LOCK

RUN = ["train.max_steps=12", "train.save_interval=1"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    launch(run_dir, 1, *RUN)
    return {row["step"]: row["loss"] for row in metrics(run_dir)}


def start(run_dir, *overrides) -> subprocess.Popen:
    """The entry point in the background, its output in run_dir/../<name>.log (a file: a full pipe
    would stall it)."""
    env = {k: v for k, v in os.environ.items() if k not in DISTRIBUTED_ENV}
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    log = open(log_path(run_dir), "w")
    return subprocess.Popen([sys.executable, "-m", "megatron_sdmoe.train", str(CONFIG), f"run.dir={run_dir}", *SMALL,
                             *RUN, *overrides], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)


def assert_resumed_exactly(run_dir, uninterrupted) -> str:
    """Resume from `latest` to the end; returns its output."""
    proc = launch(run_dir, 1, *RUN)
    # each step once: the lines logged past the checkpoint before the stop moved to metrics_replaced.jsonl
    rows = [(row["step"], row["loss"]) for row in metrics(run_dir)]
    assert rows == list(uninterrupted.items())
    assert not (run_dir / LOCK).exists()  # released at the end
    return proc.stdout


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM, signal.SIGINT])
def test_signal_saves_and_exits_for_requeue(sig, tmp_path, uninterrupted):
    proc = start(tmp_path)
    wait_for_step(proc, tmp_path, 3)
    proc.send_signal(sig)
    proc.wait(timeout=300)
    output = log_path(tmp_path).read_text()
    assert proc.returncode == EXIT_REQUEUE, output[-2000:]
    assert f"stopped early ({sig.name})" in output
    stopped_at = int((tmp_path / "checkpoints" / "latest").read_text().removeprefix("step_"))
    assert 3 <= stopped_at < 12
    assert_resumed_exactly(tmp_path, uninterrupted)


@pytest.mark.parametrize("kill_at", [2, 7])
def test_kill_9_then_restart_resumes_exactly(kill_at, tmp_path, uninterrupted):
    proc = start(tmp_path)
    wait_for_step(proc, tmp_path, kill_at)
    proc.kill()
    proc.wait()
    assert json.loads((tmp_path / LOCK).read_text())["pid"] == proc.pid  # left behind, its process gone
    output = assert_resumed_exactly(tmp_path, uninterrupted)
    assert f"took over {LOCK} from the training job on host {socket.gethostname()} (pid {proc.pid}" in output
    assert "its process has ended" in output


def test_a_second_job_in_a_running_run_dir_is_refused_and_the_first_goes_on(tmp_path):
    """A job started twice, or a rollback while the run goes on: refused with one line naming the
    job that runs there (`sdmoe-checkpoints list` names it too), nothing written; the running job is
    undisturbed and releases the lock."""
    proc = start(tmp_path, "train.max_steps=100000")
    wait_for_step(proc, tmp_path, 2)
    files = {p: p.read_bytes() for p in (tmp_path / "config.yaml", tmp_path / "starts.jsonl")}
    holder = f"is in use by the training job on host {socket.gethostname()} (pid {proc.pid}, since "
    second = launch(tmp_path, 1, *RUN, "train.lr=0.02", check=False)
    assert second.returncode == 2 and second.stderr.count("error:") == 1 and holder in second.stderr, second.stderr
    rollback = run_command("megatron_sdmoe.checkpoints", "rollback", tmp_path, 1)
    assert rollback.returncode == 2 and holder in rollback.stderr, rollback.stderr
    logged_before = metrics(tmp_path)[-1]["step"]
    listed = run_command("megatron_sdmoe.checkpoints", "list", tmp_path).stdout.splitlines()
    assert listed[-1].startswith(f"training now: the training job on host {socket.gethostname()} (pid {proc.pid}")
    progress = re.search(r"; step (\d+) of 100000 logged at \d\d:\d\d:\d\d, about (\d+ h \d+ min|\d+ min|\d+ s) to go "
                         r"at [\d,]+ tokens/s$", listed[-1])
    assert progress and logged_before <= int(progress[1]) <= metrics(tmp_path)[-1]["step"], listed[-1]
    assert {p: p.read_bytes() for p in files} == files
    assert (tmp_path / "checkpoints" / "step_00000001").exists()
    proc.send_signal(signal.SIGUSR1)
    assert proc.wait(timeout=300) == EXIT_REQUEUE
    steps = [row["step"] for row in metrics(tmp_path)]
    assert steps == list(range(1, len(steps) + 1)) and not (tmp_path / "metrics_replaced.jsonl").exists()
    assert not (tmp_path / LOCK).exists()


def test_save_killed_half_way_leaves_the_previous_checkpoint(tmp_path, uninterrupted):
    proc = launch(tmp_path, 1, *RUN, "train.exit_interval=4")
    assert "stopped at step 4 of 12 (train.exit_interval), start again to go on. TensorBoard: " in proc.stdout
    # what a crash while writing step 5 leaves: a partial temporary directory, `latest` untouched
    partial = tmp_path / "checkpoints" / ".tmp_step_00000005"
    partial.mkdir()
    (partial / "rank_00000.pt").write_bytes(b"truncated")
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step_00000004"
    assert_resumed_exactly(tmp_path, uninterrupted)
    assert not partial.exists()


def test_time_budget_and_retention(tmp_path):
    proc = launch(tmp_path, 1, *RUN, "train.time_budget_minutes=0.001", "train.keep_checkpoints=2", check=False)
    assert proc.returncode == EXIT_REQUEUE and "stopped early (time budget)" in proc.stdout
    launch(tmp_path, 1, *RUN, "train.keep_checkpoints=2")
    checkpoints = sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*"))
    assert checkpoints == ["step_00000011", "step_00000012"]
    assert json.loads((tmp_path / "checkpoints" / "step_00000012" / "meta.json").read_text())["step"] == 12


def test_time_budget_counts_from_the_process_start():
    """What runs before training (the imports: seconds of torch and megatron-core) counts too: a
    budget set to a job's time limit must leave room for it."""
    code = ("import time; time.sleep(2); from megatron_sdmoe.runtime import preemption; "
            "print(time.monotonic() - preemption.STARTED)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert float(proc.stdout.splitlines()[-1]) >= 2.0


def test_time_budget_keeps_room_for_a_step_and_a_checkpoint(single_process_groups):
    """The budget counts from start-up and stops once the longest step and the longest save seen
    (before the first: the checkpoint's load) would no longer both fit, after the save of a step
    that saves anyway (train.save_interval) where it does."""
    from megatron_sdmoe.runtime import preemption

    handlers = {sig: signal.getsignal(sig) for sig in preemption.SIGNALS}
    try:
        elapsed_minutes = (time.monotonic() - preemption.STARTED) / 60
        stop = preemption.StopRequest(elapsed_minutes + 100 / 60, torch.device("cpu"))  # 100 s left
        assert stop.after_step(60.0) is None
        stop.saved(30.0)
        assert stop.after_step(1.0) is None  # 60 + 30 s still fit
        stop.saved(45.0)
        assert stop.after_step(1.0) == "time budget"
        # a step that saves anyway: its save, then 60 + 30 s, no longer fit
        elapsed_minutes = (time.monotonic() - preemption.STARTED) / 60
        saving = preemption.StopRequest(elapsed_minutes + 100 / 60, torch.device("cpu"), 30.0)
        assert saving.after_step(60.0) is None and saving.after_step(1.0, saving=True) == "time budget"
        # before the first save, a resumed run's checkpoint load stands in for one
        elapsed_minutes = (time.monotonic() - preemption.STARTED) / 60
        assert preemption.StopRequest(elapsed_minutes + 100 / 60, torch.device("cpu"), 45.0).after_step(60.0)
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


def _same_weights(a, b) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a if isinstance(a[k], torch.Tensor))


@pytest.mark.parametrize("precision", ["fp32", "bf16"])  # bf16: DeepSpeed's BF16_Optimizer checks the norm itself
def test_non_finite_steps_are_skipped(precision, tmp_path):
    launch(tmp_path, 1, "train.max_steps=6", "train.save_interval=1", f"train.precision={precision}",
           module="tests.workers.nan_loss", env={"NAN_STEPS": "3,4"})
    rows = {row["step"]: row for row in metrics(tmp_path)}
    assert [rows[s]["skipped_steps"] for s in range(1, 7)] == [0, 0, 1, 2, 2, 2]
    assert rows[3]["grad_norm"] == rows[4]["grad_norm"] == float("inf")
    assert rows[5]["lr"] == rows[3]["lr"]  # the schedule waits too
    assert _same_weights(rank_file(tmp_path, 4)["model"], rank_file(tmp_path, 2)["model"])  # no update from the NaN steps
    assert not _same_weights(rank_file(tmp_path, 5)["model"], rank_file(tmp_path, 4)["model"])


def test_too_many_non_finite_steps_stop_with_the_last_good_weights(tmp_path):
    proc = launch(tmp_path, 1, "train.max_steps=12", "train.save_interval=0", "train.max_skipped_steps=3",
                  module="tests.workers.nan_loss", env={"NAN_STEPS": "3-100"}, check=False)
    assert proc.returncode == 4
    assert proc.stderr.strip().splitlines()[-1].startswith(
        "error: training diverged: 3 optimizer steps in a row had a non-finite gradient norm and were skipped "
        "(steps 3-5)")
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step_00000005"
    launch(tmp_path / "two", 1, "train.max_steps=2", "train.save_interval=1")
    assert _same_weights(rank_file(tmp_path, 5)["model"], rank_file(tmp_path / "two", 2)["model"])


def test_a_stop_changes_nothing_the_loop_counts(tmp_path):
    """Stopped at step 4 (train.exit_interval) and started again, a run counts as one that never
    stopped: the non-finite steps in a row (it still diverges at step 6), all of them
    (`skipped_steps`), and the expert load since the last logged step (steps 4-6)."""
    run = ["train.max_steps=8", "train.max_skipped_steps=4", "train.log_interval=3", "train.eval_interval=0"]
    nan = {"module": "tests.workers.nan_loss", "env": {"NAN_STEPS": "3-6"}, "check": False}
    straight = launch(tmp_path / "straight", 1, *run, **nan)
    assert launch(tmp_path / "stopped", 1, *run, "train.exit_interval=4", **nan).returncode == 0
    again = launch(tmp_path / "stopped", 1, *run, **nan)
    assert straight.returncode == again.returncode == 4
    assert straight.stderr.strip().splitlines()[-1] == again.stderr.strip().splitlines()[-1]  # steps 3-6
    want, got = metrics(tmp_path / "straight")[-1], metrics(tmp_path / "stopped")[-1]
    assert got["step"] == want["step"] == 6 and got["skipped_steps"] == want["skipped_steps"] == 4
    assert got["expert_load_max_over_mean"] == pytest.approx(want["expert_load_max_over_mean"], abs=1e-9)


def test_the_entry_point_leaves_the_signal_handlers_as_it_found_them(capsys):
    """sdmoe-train's main() run inside another program (tests call it in-process): a SIGTERM
    handler left behind made a later multiprocessing pool's workers, forked from it, outlive
    Pool.terminate, and the test run hung."""
    from megatron_sdmoe import train
    from megatron_sdmoe.runtime import preemption

    before = {sig: signal.getsignal(sig) for sig in preemption.SIGNALS}
    with pytest.raises(SystemExit):
        train.main(["--help"])
    assert {sig: signal.getsignal(sig) for sig in preemption.SIGNALS} == before


def test_stop_signals_at_the_last_step_and_before_the_first(tmp_path):
    """A signal during the last step: the run is done (exit 0), not stopped early (exit 3 would
    requeue a job with nothing left to do); one during an earlier step stops it early, and so does
    one while the run is set up (data, model, checkpoint: minutes at scale), after its first step."""
    signalled = {"module": "tests.workers.signal_at_step", "check": False}
    proc = launch(tmp_path / "last", 1, "train.max_steps=2", **signalled, env={"SIGNAL_AT_STEP": "2"})
    assert proc.returncode == 0 and "done." in proc.stdout, proc.stdout[-2000:] + proc.stderr[-2000:]
    for step in (1, 0):
        proc = launch(tmp_path / f"at_{step}", 1, "train.max_steps=3", **signalled, env={"SIGNAL_AT_STEP": str(step)})
        assert proc.returncode == EXIT_REQUEUE and "stopped early (SIGUSR1)" in proc.stdout, proc.stderr[-2000:]
        assert (tmp_path / f"at_{step}" / "checkpoints" / "latest").read_text() == "step_00000001"


def test_a_checkpoint_write_failing_on_one_rank_stops_every_rank_with_one_line(tmp_path):
    """A full disk or a quota on one rank of two (a file size limit stands in for it): every rank
    stops at the checkpoint with exit code 2 and one line naming the OS's reason and the rank,
    `latest` still names the previous checkpoint and no partial one is left; once there is space,
    starting again resumes."""
    layout = ["parallel.expert=2", "train.save_interval=2"]
    launch(tmp_path, 2, "train.max_steps=2", *layout)
    size = (tmp_path / "checkpoints" / "step_00000002" / "rank_00001.pt").stat().st_size
    proc = launch(tmp_path, 2, "train.max_steps=4", *layout, module="tests.workers.file_size_limit",
                  env={"FULL_RANK": "1", "FILE_SIZE_LIMIT": str(size // 2)}, check=False)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-3000:]
    assert "step_00000004 failed (File too large): free space or quota under" in errors[0], errors[0]
    assert "(checkpoints/latest still names step_00000002) [seen on rank 1 of 2, host " in errors[0], errors[0]
    checkpoints = tmp_path / "checkpoints"
    assert (checkpoints / "latest").read_text() == "step_00000002"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", "step_00000002"]
    assert not (tmp_path / LOCK).exists()  # released by the job that stopped with the error
    launch(tmp_path, 2, "train.max_steps=4", *layout)
    assert (checkpoints / "latest").read_text() == "step_00000004"


def test_running_out_of_gpu_memory_is_one_line_with_what_to_change(tmp_path):
    """torch's out-of-memory error on a rank (injected at step 2: no GPU here to fill): that rank
    prints one line with torch's own first line and what to change, exit code 2 (requeueing would
    run out again); the checkpoint before it stays."""
    proc = launch(tmp_path, 1, "train.max_steps=4", "train.save_interval=1", module="tests.workers.out_of_memory",
                  check=False)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and errors == [
        "error: rank 0 ran out of GPU memory (CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total "
        "capacity of 79.19 GiB of which 1.05 GiB is free.): lower train.micro_batch_size, set "
        "train.recompute=selective (or full), or spread the model over more GPUs (sdmoe-estimate CONFIG --gpus N "
        "says what fits)"], proc.stderr[-3000:]
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step_00000001"


def test_running_out_of_host_memory_is_one_line(tmp_path):
    """Building the model in host memory (each rank its part, drawn whole tensor by tensor): torch's
    CPU allocator's error, one line with what to change, exit code 2, nothing written."""
    proc = launch(tmp_path / "run", 1, module="tests.workers.out_of_memory", env={"OUT_OF_MEMORY": "host"},
                  check=False)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-3000:]
    assert errors[0].startswith("error: rank 0 ran out of host memory (") and "DefaultCPUAllocator" in errors[0]
    assert errors[0].endswith("(sdmoe-estimate CONFIG says how large it is)")
    assert not (tmp_path / "run" / "config.yaml").exists()


def test_a_metrics_write_that_fails_is_one_line(tmp_path):
    """A full disk or a quota under run.dir while logging (a file size limit stands in for it): the
    rank that writes the metrics stops with one line naming the directory, the reason and the fix."""
    code = f"""
import resource, signal
from pathlib import Path
from megatron_sdmoe.errors import UserError
from megatron_sdmoe.training.metrics import MetricsLogger
logger = MetricsLogger(Path({str(tmp_path)!r}), True, 0)
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (2000, resource.RLIM_INFINITY))
try:
    for step in range(1, 1000):
        logger.log(step, {{"loss": 1.0, "lr": 0.1}})
except UserError as e:
    print(e)
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.stdout.strip() == (f"writing into run.dir {tmp_path} failed (File too large): free space or quota "
                                   "there, then start again"), proc.stdout + proc.stderr[-2000:]
