"""run.dir's lock: a start meets a lock whose holder may still run and is refused; a lock whose
holder is gone (its process ended on this host, an earlier run of the same SLURM job, a host
restarted since, no heartbeat for STALE seconds elsewhere) is taken over with a line saying whose
it was. The holders here are real processes of this machine, or locks as another host writes them.
(test_preemption starts a second job beside a running one, and restarts after kill -9.)"""
import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import asdict, replace

import pytest

from megatron_sdmoe.errors import UserError
from megatron_sdmoe.runtime import run_lock
from megatron_sdmoe.runtime.run_lock import LOCK, STALE, Holder, RunLock


def write_lock(run_dir, holder: Holder, quiet: float = 0.0) -> None:
    """A lock as `holder` writes it, last refreshed `quiet` seconds ago."""
    path = run_dir / LOCK
    path.write_text(json.dumps(asdict(holder)))
    os.utime(path, (time.time() - quiet, time.time() - quiet))


@pytest.fixture
def elsewhere():
    """The holder of a job on another node."""
    return replace(Holder.this_process(), host="node-elsewhere", boot="another-boot", pid=4242,
                   process_start="1234", slurm_job="77")


@pytest.fixture
def sleeper():
    """A live process on this host, and its holder record."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    yield proc, replace(Holder.this_process(), pid=proc.pid, process_start=run_lock._process_start(proc.pid))
    proc.kill()
    proc.wait()


def test_acquire_writes_who_holds_it_and_release_removes_it(tmp_path):
    with RunLock(tmp_path / "run") as lock:
        assert lock.acquire() is None
        held = json.loads((tmp_path / "run" / LOCK).read_text())
        assert held["pid"] == os.getpid() and held["host"] == Holder.this_process().host
        assert held["process_start"] == run_lock._process_start(os.getpid()) is not None
    assert not (tmp_path / "run" / LOCK).exists()


def test_release_leaves_a_lock_another_job_has_taken(tmp_path, elsewhere):
    lock = RunLock(tmp_path)
    lock.acquire()
    write_lock(tmp_path, elsewhere)  # taken over by another job while this one was silent
    lock.release()
    assert json.loads((tmp_path / LOCK).read_text())["host"] == "node-elsewhere"


def test_a_live_job_elsewhere_holds_it(tmp_path, elsewhere):
    write_lock(tmp_path, elsewhere, quiet=STALE - 10)
    with pytest.raises(UserError) as refused:
        RunLock(tmp_path).acquire()
    assert str(refused.value).startswith(
        f"run.dir {tmp_path} is in use by the training job on host node-elsewhere (pid 4242, SLURM job 77, since ")
    assert str(refused.value).endswith(f"if that job is gone, remove {tmp_path / LOCK}")
    assert json.loads((tmp_path / LOCK).read_text()) == asdict(elsewhere)  # untouched


def test_a_live_process_on_this_host_holds_it(tmp_path, sleeper):
    proc, holder = sleeper
    write_lock(tmp_path, holder, quiet=10 * STALE)  # alive counts here, not the heartbeat
    with pytest.raises(UserError, match=f"pid {proc.pid}"):
        RunLock(tmp_path).acquire()


@pytest.mark.parametrize("case, why", [
    ("silent elsewhere", "no heartbeat for"),
    ("same SLURM job", "an earlier run of this SLURM job (77)"),
    ("ended here", "its process has ended"),
    ("pid reused here", "its process has ended"),
    ("host restarted", "its host has restarted since"),
    ("silent in another pid namespace here", "no heartbeat for"),
    ("unreadable, old", "cannot be read (it may be being written): unchanged for"),
])
def test_a_gone_holder_is_taken_over(case, why, tmp_path, elsewhere, sleeper, monkeypatch):
    here = Holder.this_process()
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended_start = run_lock._process_start(ended.pid)  # may be None if it has already ended: ended either way
    ended.wait()
    if case == "silent elsewhere":
        write_lock(tmp_path, elsewhere, quiet=STALE + 5)
    elif case == "same SLURM job":  # a requeued job, maybe on other nodes now
        monkeypatch.setenv("SLURM_JOB_ID", "77")
        write_lock(tmp_path, elsewhere)
    elif case == "ended here":
        write_lock(tmp_path, replace(here, pid=ended.pid, process_start=ended_start or "1"))
    elif case == "pid reused here":  # the pid runs, but another process than the one that wrote the lock
        write_lock(tmp_path, replace(sleeper[1], process_start="1"))
    elif case == "host restarted":
        write_lock(tmp_path, replace(sleeper[1], boot="an-earlier-boot"))
    elif case == "silent in another pid namespace here":
        write_lock(tmp_path, replace(here, pid=ended.pid, pid_namespace="pid:[1]"), quiet=STALE + 5)
    else:
        (tmp_path / LOCK).write_text('{"host": "no')  # torn by a crash long ago
        os.utime(tmp_path / LOCK, (time.time() - STALE - 5,) * 2)
    lock = RunLock(tmp_path)
    note = lock.acquire()
    assert note.startswith(f"run.dir {tmp_path}: took over {LOCK} from ") and why in note, note
    assert json.loads((tmp_path / LOCK).read_text())["pid"] == os.getpid()
    lock.release()


def test_a_job_in_another_pid_namespace_here_is_judged_by_its_heartbeat(tmp_path):
    """A container that shares this host's name but not its processes: its pid, not running in
    this namespace, says nothing; its heartbeat does."""
    holder = replace(Holder.this_process(), pid=2 ** 22 + 1, pid_namespace="pid:[1]")  # above any pid here
    write_lock(tmp_path, holder, quiet=STALE - 10)
    with pytest.raises(UserError, match=f"is in use by the training job on host {holder.host} "):
        RunLock(tmp_path).acquire()


def _start(run_dir, index: int, ready, held, results) -> None:
    """A start (a forked process) that judges the lock as late as its `index` says, then takes it or
    is refused, and lives on until every start has tried."""
    judge = Holder.gone
    Holder.gone = lambda holder, quiet: (judge(holder, quiet), time.sleep(0.05 * index))[0]
    ready.wait()
    try:
        RunLock(run_dir).acquire()
        results.put((os.getpid(), "took"))
    except UserError as e:
        results.put((os.getpid(), str(e)))
    held.wait()
    os._exit(0)


def test_of_starts_meeting_a_gone_jobs_lock_at_once_one_takes_it(tmp_path):
    """Four starts at once, each judging the ended job's lock gone a little after the one before:
    one takes it (and holds the lock file), the others are refused: as having met a start at the same
    moment, or (reading the lock after it was taken) naming its holder, or seeing it being written;
    ten times."""
    import multiprocessing

    fork = multiprocessing.get_context("fork")
    for _ in range(10):
        ended = subprocess.Popen([sys.executable, "-c", "pass"])
        ended.wait()
        write_lock(tmp_path, replace(Holder.this_process(), pid=ended.pid, process_start="1"))
        ready, held, results = fork.Barrier(4), fork.Barrier(5), fork.Queue()
        starts = [fork.Process(target=_start, args=(tmp_path, i, ready, held, results)) for i in range(4)]
        for start in starts:
            start.start()
        outcomes = dict(results.get(timeout=120) for _ in starts)
        holder = json.loads((tmp_path / LOCK).read_text())["pid"]
        held.wait()
        for start in starts:
            start.join()
        assert [pid for pid, outcome in outcomes.items() if outcome == "took"] == [holder], outcomes
        refusals = (f"run.dir {tmp_path} was taken by another job starting at the same moment",  # judged it gone
                    f"run.dir {tmp_path} is in use by the training job on host {socket.gethostname()} (pid {holder},",
                    f"run.dir {tmp_path} is in use by a job whose {LOCK} cannot be read (it may be being written)")
        assert all(outcome.startswith(refusals) for pid, outcome in outcomes.items() if pid != holder), outcomes
        assert [p.name for p in tmp_path.iterdir()] == [LOCK]


def test_a_lock_being_written_is_not_taken(tmp_path):
    (tmp_path / LOCK).write_text("")  # created, its holder not yet written
    with pytest.raises(UserError, match=f"is in use by a job whose {LOCK} cannot be read"):
        RunLock(tmp_path).acquire()


def test_the_heartbeat_keeps_the_lock_fresh(tmp_path, monkeypatch):
    monkeypatch.setattr(run_lock, "HEARTBEAT", 0.05)
    with RunLock(tmp_path) as lock:
        lock.acquire()
        os.utime(tmp_path / LOCK, (time.time() - 1000,) * 2)
        time.sleep(0.5)
        assert time.time() - (tmp_path / LOCK).stat().st_mtime < 1


def test_launch_refuses_and_submit_notes_a_running_job(tmp_path, elsewhere):
    """sdmoe-launch refuses before starting any process; sdmoe-submit says so and writes the job,
    which may be meant to continue that one."""
    from conftest import CONFIG, SMALL, run_command

    run = tmp_path / "run"
    run.mkdir()
    write_lock(run, elsewhere)
    busy = f"run.dir {run} is in use by the training job on host node-elsewhere (pid 4242, SLURM job 77, since "
    launched = run_command("megatron_sdmoe.launch.local", CONFIG, "--gpus", "2", f"run.dir={run}", *SMALL)
    assert launched.returncode == 2 and launched.stderr.count("\n") == 1, launched.stderr
    assert launched.stderr.startswith(f"error: {busy}")
    submitted = run_command("megatron_sdmoe.launch.slurm", CONFIG, f"run.dir={run}", *SMALL, "--nodes", "1",
                            "--gpus-per-node", "2", "--dry-run")
    assert submitted.returncode == 0 and (run / "slurm" / "job.sbatch").is_file(), submitted.stderr
    assert submitted.stderr.startswith(f"note: {busy}")
