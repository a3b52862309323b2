"""Shared helpers: launch the real entry point (one process, or gloo ranks as torchrun starts them)."""
from __future__ import annotations

import importlib
import io
import json
import multiprocessing
import multiprocessing.connection
import multiprocessing.forkserver
import os
import runpy
import subprocess
import sys
import tempfile
import time
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from unittest import mock

import pytest
import torch

from megatron_sdmoe.runtime.distributed import free_port

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
    """Run `python -m module` on `config` + SMALL + overrides in `nproc` processes, each with the
    rendezvous variables torchrun gives its workers; returns the processes' exit code and output."""
    return launch_module(module, [str(config), f"run.dir={run_dir}", *SMALL, *overrides], nproc, check, env)


def launch_module(module: str, args: list[str], nproc: int, check: bool = True,
                  env: dict | None = None) -> subprocess.CompletedProcess:
    """`python -m module args...` in `nproc` processes, as `launch` runs them."""
    env = run_env(**(env or {}))
    if FORKED:
        proc = _forked(module, args, nproc, env)
    elif nproc > 1:
        proc = python_m("torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m", module, *args, env=env)
    else:
        proc = python_m(module, *args, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"{module} in {nproc} processes exited {proc.returncode}\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-6000:]}")
    return proc


# A fresh interpreter spends ~12 s of CPU importing torch, megatron-core, DeepSpeed and transformers:
# most of a tiny run's time. So launched ranks are forks of multiprocessing's fork server, which has
# imported the trainer once. Each rank is still its own process, running `python -m module` (runpy)
# with the environment a launched run gets. What forks cannot show (all ranks share one hash seed,
# import-time output goes to the server) is left to the tests that start torchrun, the SLURM script
# and fresh processes: test_launch, test_slurm, test_preemption, test_config's CLI cases.
# CUDA does not survive a fork: with a GPU, every run is a fresh process.
FORKED = not torch.cuda.is_available()
_FORK_SERVER = multiprocessing.get_context("forkserver")
_FORK_SERVER.set_forkserver_preload(["megatron_sdmoe.train"])


def _forked(module: str, args: list[str], nproc: int, env: dict) -> subprocess.CompletedProcess:
    with mock.patch.dict(os.environ, run_env(), clear=True):  # the server's interpreter reads OMP_NUM_THREADS etc. when it starts, as a run's would
        multiprocessing.forkserver.ensure_running()
    if nproc > 1:
        rendezvous = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": str(nproc),
                      "LOCAL_WORLD_SIZE": str(nproc)}
        envs = [{**env, **rendezvous, "RANK": str(rank), "LOCAL_RANK": str(rank)} for rank in range(nproc)]
    else:
        envs = [env]
    with tempfile.TemporaryDirectory() as logs:
        out, err = Path(logs, "stdout"), Path(logs, "stderr")
        out.touch()  # both exist (empty) even if a rank fails before its first line
        err.touch()
        ranks = [_FORK_SERVER.Process(target=_run_rank, args=(module, args, rank_env, out, err)) for rank_env in envs]
        for rank in ranks:
            rank.start()
        try:
            returncode = _wait(ranks, timeout=900)
        finally:
            for rank in ranks:  # also when the wait is interrupted: no rank outlives its test
                rank.kill()
        return subprocess.CompletedProcess([module, *args], returncode, out.read_text(), err.read_text())


def _run_rank(module: str, args: list[str], env: dict, stdout: Path, stderr: Path) -> None:
    """In the forked rank: all ranks append to one stdout and one stderr, as under torchrun."""
    for fd, path in ((1, stdout), (2, stderr)):
        os.dup2(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644), fd)
    os.environ.clear()
    os.environ.update(env)
    os.chdir(REPO)
    sys.path.insert(0, str(REPO))  # as `python -m` puts its working directory first
    sys.argv = [module, *args]
    from megatron_sdmoe.runtime import preemption
    preemption.STARTED = time.monotonic()  # the rank's start, not the server's: what a time budget counts from
    runpy.run_module(module, run_name="__main__", alter_sys=True)


def _wait(ranks: list, timeout: float) -> int:
    """The first failed rank's exit code, else 0. Once a rank has failed, the others get a few
    seconds to end on their own (they may be failing the same way) before the caller kills them,
    as torchrun stops the workers."""
    deadline, returncode, running = time.monotonic() + timeout, 0, {rank.sentinel: rank for rank in ranks}
    while running:
        ended = multiprocessing.connection.wait(list(running), timeout=max(0.0, deadline - time.monotonic()))
        if not ended:
            if returncode:
                return returncode
            raise subprocess.TimeoutExpired("launched ranks", timeout)
        for sentinel in ended:
            rank = running.pop(sentinel)
            rank.join()
            if rank.exitcode and not returncode:
                returncode, deadline = rank.exitcode, min(deadline, time.monotonic() + 10)
    return returncode


def python_m(module: str, *args, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python -m module args...` in a fresh interpreter, run from the repository (env: run_env())."""
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=REPO, env=env or run_env(),
                          capture_output=True, text=True, timeout=900)


def run_command(module: str, *args, process: bool = False) -> subprocess.CompletedProcess:
    """`python -m module args...` as its process ends: exit code, stdout, stderr. By default its
    `main(argv)` is called in this process, the function the console script calls, which saves the
    ~10 s a new process spends importing torch and megatron-core. `process=True` runs a real process:
    each command's tests keep one such case, so that library output around the one error line shows."""
    if process:
        return python_m(module, *args)
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


def sample_tokenizer() -> str:
    """The override that gives a model imported without a tokenizer of its own (a transformers-
    initialised one, of the built-in corpus's vocabulary size) the built-in corpus's tokenizer."""
    from megatron_sdmoe.data import ensure_sample_corpus

    return f"data.tokenizer={ensure_sample_corpus().tokenizer_dir}"


def rank_file(run_dir: Path, step: int) -> dict:
    """What rank 0 saved in step `step`'s checkpoint of `run_dir` (its model, optimizer, ...)."""
    return torch.load(Path(run_dir) / "checkpoints" / f"step_{step:08d}" / "rank_00000.pt", weights_only=False)


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="session")
def single_process_groups():
    """megatron-core parallel state for one process (gloo), for tests that build modules in-process."""
    from megatron_sdmoe.runtime import init_distributed, shutdown

    init_distributed(tensor=1, expert=1, expert_tensor=1)
    yield
    shutdown()


@pytest.fixture(scope="module")
def domains(tmp_path_factory):
    """Two corpora from the sample documents: the even ones as written, the odd ones upper-cased."""
    from megatron_sdmoe.data import ensure_sample_corpus, load_tokenizer, sample_documents, write_indexed

    root = tmp_path_factory.mktemp("domains")
    tokenizer_dir = ensure_sample_corpus().tokenizer_dir
    tok = load_tokenizer(tokenizer_dir)
    docs = sample_documents()
    for name, texts in (("prose", docs[0::2]), ("shout", [d.upper() for d in docs[1::2]])):
        write_indexed(str(root / name), ([*tok.tokenize(t), tok.eod] for t in texts), tok.vocab_size)
    return {"prose": str(root / "prose"), "shout": str(root / "shout"), "tokenizer": tokenizer_dir}
