"""sdmoe-launch: N processes on this machine through torchrun (gloo on the CPU). Two processes at
EP2 equal one process (also under DeepSpeed's launcher); SIGUSR1 or SIGTERM to the launcher reaches
the workers, which save and stop, and the launcher exits with their requeue code 3 (plain torchrun
would exit 1, and on SIGTERM end the workers itself, with a traceback); bad input is refused with
one line and exit code 2 before any process starts."""
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import CONFIG, REPO, SMALL, free_port, launch, log_path, metrics, run_env, wait_for_step

from megatron_sdmoe.runtime.preemption import EXIT_REQUEUE

SDMOE_LAUNCH = Path(sys.executable).with_name("sdmoe-launch")  # the installed entry point


def command(run_dir, *args) -> list[str]:
    return [str(SDMOE_LAUNCH), str(CONFIG), "--gpus", "2", f"run.dir={run_dir}", *SMALL, "parallel.expert=2", *args]


def assert_equals_one_process(run: subprocess.CompletedProcess, tmp_path) -> None:
    """`run` trained tmp_path/ep2 as one process does tmp_path/one."""
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    launch(tmp_path / "one", 1)
    got, want = metrics(tmp_path / "ep2"), metrics(tmp_path / "one")
    assert [row["step"] for row in got] == [1, 2, 3, 4]
    for g, w in zip(got, want, strict=True):
        assert g["loss"] == pytest.approx(w["loss"], abs=2e-5)


def test_two_processes_equal_one(tmp_path):
    run = subprocess.run(command(tmp_path / "ep2"), cwd=REPO, env=run_env(), capture_output=True, text=True,
                         timeout=900)
    assert_equals_one_process(run, tmp_path)


def test_deepspeed_launcher(tmp_path):
    """DeepSpeed's per-node launcher (what the `deepspeed` command starts on each node) passes every
    worker `--local_rank`; two processes at EP2 under it equal one process too."""
    import base64
    import json

    hosts = base64.urlsafe_b64encode(json.dumps({"localhost": [0, 1]}).encode()).decode()
    run = subprocess.run([sys.executable, "-m", "deepspeed.launcher.launch", f"--world_info={hosts}", "--node_rank=0",
                          "--master_addr=127.0.0.1", f"--master_port={free_port()}", "--module", "megatron_sdmoe.train",
                          str(CONFIG), f"run.dir={tmp_path / 'ep2'}", *SMALL, "parallel.expert=2"],
                         cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=900)
    assert_equals_one_process(run, tmp_path)


@pytest.mark.parametrize("signum", [signal.SIGUSR1, signal.SIGTERM], ids=["SIGUSR1", "SIGTERM"])
def test_the_stop_signals_reach_the_workers(signum, tmp_path):
    run_dir = tmp_path / "run"
    with open(log_path(run_dir), "w") as log:
        proc = subprocess.Popen(command(run_dir, "train.max_steps=200"), cwd=REPO, env=run_env(), stdout=log,
                                stderr=subprocess.STDOUT)
    wait_for_step(proc, run_dir, 2)
    proc.send_signal(signum)
    proc.wait(timeout=300)
    output = log_path(run_dir).read_text()
    assert proc.returncode == EXIT_REQUEUE, output[-3000:]
    assert f"stopped early ({signal.Signals(signum).name})" in output
    assert (run_dir / "checkpoints" / "latest").exists()


def test_a_stop_while_the_workers_import_is_kept(tmp_path):
    """SIGUSR1 passed on while the workers import torch and megatron-core (for seconds, before the
    training's handlers exist) ended them with exit code 138: no checkpoint, no requeue. They keep
    it, and stop after their first step."""
    import psutil

    run_dir = tmp_path / "run"
    with open(log_path(run_dir), "w") as log:
        proc = subprocess.Popen(command(run_dir, "train.max_steps=200"), cwd=REPO, env=run_env(), stdout=log,
                                stderr=subprocess.STDOUT)
    launcher = psutil.Process(proc.pid)
    while len(launcher.children()) < 2 and proc.poll() is None:
        time.sleep(0.01)
    time.sleep(1.0)  # into their imports (the interpreter's own start-up, a fraction of that, is not covered)
    proc.send_signal(signal.SIGUSR1)
    proc.wait(timeout=300)
    output = log_path(run_dir).read_text()
    assert proc.returncode == EXIT_REQUEUE and "stopped early (SIGUSR1)" in output, output[-3000:]
    assert [row["step"] for row in metrics(run_dir)] == [1]


def test_a_stop_before_the_workers_exist_reaches_them(tmp_path):
    """SIGUSR1 to one node's launcher while it waits for the other node (the rendezvous of
    sdmoe-submit --per-node) was dropped: the run trained on to its end. The workers take it when they start."""
    run_dir, port = tmp_path / "run", free_port()

    def node(rank: int) -> subprocess.Popen:
        with open(tmp_path / f"node{rank}.log", "w") as log:
            return subprocess.Popen([sys.executable, "-m", "megatron_sdmoe.launch.torchrun", "--nnodes=2",
                                     "--nproc-per-node=1", "--rdzv-backend=static",
                                     f"--rdzv-endpoint=127.0.0.1:{port}", "-m", "megatron_sdmoe.train", str(CONFIG),
                                     f"run.dir={run_dir}", *SMALL, "parallel.expert=2", "train.max_steps=200"],
                                    cwd=REPO, env=run_env(PET_NODE_RANK=str(rank)), stdout=log, stderr=subprocess.STDOUT)

    first = node(0)
    time.sleep(3)  # waiting for node 1: no worker yet
    first.send_signal(signal.SIGUSR1)
    second = node(1)
    for proc in (first, second):
        proc.wait(timeout=300)
    output = (tmp_path / "node0.log").read_text()
    assert (first.returncode, second.returncode) == (EXIT_REQUEUE, EXIT_REQUEUE), output[-3000:]
    assert "stopped early (SIGUSR1)" in output and [row["step"] for row in metrics(run_dir)] == [1]


def test_a_second_sigterm_ends_the_launch(tmp_path):
    """Asked again (a worker hung while saving), the launcher ends its workers as torchrun does."""
    import psutil

    run_dir = tmp_path / "run"
    with open(log_path(run_dir), "w") as log:
        proc = subprocess.Popen(command(run_dir, "train.max_steps=200"), cwd=REPO, env=run_env(), stdout=log,
                                stderr=subprocess.STDOUT)
    wait_for_step(proc, run_dir, 2)
    workers = psutil.Process(proc.pid).children()
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.05)  # two signals at once reach a Python handler once
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, log_path(run_dir).read_text()[-3000:]
    assert workers and not any(worker.is_running() for worker in workers)


@pytest.mark.parametrize("case", ["layout", "run.dir under a file"])
def test_bad_input_before_any_process(tmp_path, case):
    run_dir, extra, message = tmp_path / "run", "parallel.expert=4", (
        "error: world size 2 is not divisible by parallel.expert x parallel.expert_tensor = 4: launch a multiple "
        "of 4 processes or lower parallel.expert")
    if case == "run.dir under a file":
        (tmp_path / "file").write_text("")
        run_dir, extra = tmp_path / "file" / "run", "parallel.expert=2"
        message = f"error: run.dir {run_dir} is not writable (Not a directory): choose another run.dir"
    run = subprocess.run(command(run_dir, extra), cwd=REPO, env=run_env(), capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == [message]  # no worker's line, no torchrun's
    assert not run_dir.exists()
