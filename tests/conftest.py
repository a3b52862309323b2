"""Shared helpers: launch the real entry point (one process, or torchrun with gloo ranks)."""
from __future__ import annotations

import importlib
import io
import json
import os
import subprocess
import sys
import time
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "tiny-qwen3-moe.yaml"
# The demo's model, shrunk so that multi-process runs fit the CPU test budget.
SMALL = ["model.hidden_size=64", "model.num_layers=2", "moe.ffn_hidden_size=64", "data.seq_length=64",
         "train.global_batch_size=8", "train.micro_batch_size=2", "train.eval_samples=8", "train.lr=0.01",
         "train.warmup_steps=1", "train.max_steps=4", "train.log_interval=1", "train.eval_interval=0",
         "train.save_interval=0"]


DISTRIBUTED_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def run_env(**extra: str) -> dict:
    """The environment for a launched run. The test process may hold a process group of its own
    (single_process_groups): its rendezvous variables must not leak into the launched runs."""
    inherited = {k: v for k, v in os.environ.items() if k not in DISTRIBUTED_ENV}
    return {**inherited, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "PYTHONUNBUFFERED": "1", **extra}


def launch(run_dir: Path, nproc: int, *overrides: str, module: str = "megatron_sdmoe.train",
           check: bool = True, env: dict | None = None, config: Path = CONFIG) -> subprocess.CompletedProcess:
    """Run `module` on `config` + SMALL + overrides in `nproc` processes (torchrun when > 1)."""
    if nproc == 1:
        cmd = [sys.executable, "-m", module]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", module]
    proc = subprocess.run(cmd + [str(config), f"run.dir={run_dir}", *SMALL, *overrides], cwd=REPO,
                          env=run_env(**(env or {})), capture_output=True, text=True, timeout=900)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def run_command(module: str, *args, process: bool = False) -> subprocess.CompletedProcess:
    """`python -m module args...` as its process ends: exit code, stdout, stderr. By default its
    `main(argv)` is called in this process, the function the console script calls, which saves the
    ~10 s a new process spends importing torch and megatron-core. `process=True` runs a real process:
    each command's tests keep one such case, so that library output around the one error line shows."""
    if process:
        return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=REPO, env=run_env(),
                              capture_output=True, text=True, timeout=900)
    out, err, code = io.StringIO(), io.StringIO(), 0
    with redirect_stdout(out), redirect_stderr(err):
        try:
            importlib.import_module(module).main([str(arg) for arg in args])
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else int(exit_.code is not None)
    return subprocess.CompletedProcess(list(args), code, out.getvalue(), err.getvalue())


def log_path(run_dir: Path) -> Path:
    """Where a run started in the background writes its output (a file: a full pipe would stall it)."""
    return run_dir.with_name(run_dir.name + ".log")


def wait_for_step(proc: subprocess.Popen, run_dir: Path, step: int, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        if (run_dir / "metrics.jsonl").exists() and len((run_dir / "metrics.jsonl").read_text().splitlines()) >= step:
            return
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"no step {step} within {timeout} s: {log_path(run_dir).read_text()[-2000:]}")


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="session")
def single_process_groups():
    """megatron-core parallel state for one process (gloo), for tests that build modules in-process."""
    from megatron_sdmoe.runtime import init_distributed, shutdown

    init_distributed(tensor=1, expert=1, expert_tensor=1)
    yield
    shutdown()
