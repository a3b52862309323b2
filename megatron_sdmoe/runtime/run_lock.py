"""One training job per run directory: `<run.dir>/run.lock`.

Two jobs in one run.dir (a job submitted twice, a start while the last one still runs) would write
the same checkpoints, rewrite each other's config.yaml and metrics and race on checkpoints/latest:
a silent wrong result. So rank 0 of a training job holds run.lock while the job runs: who holds it
(host, process, SLURM job) as JSON, its modification time refreshed every HEARTBEAT seconds by a
background thread. A start that finds the lock held by a live job is refused (one line, exit 2,
nothing written); so is `sdmoe-checkpoints rollback`.

A lock whose holder is gone is taken over, with a line that says whose it was and why:
- on this host: its process has ended (kill -9, a crash, a reboot), told by pid and the process's
  start time, so that a reused pid is not taken for the holder (in the same pid namespace: a
  container that shares the host's name but not its processes counts as elsewhere);
- the same SLURM job: an earlier run of a requeued job (SLURM ends it before it requeues);
- anywhere else: no heartbeat for STALE seconds.
Of several starts that meet the same gone job's lock at once, one takes it: the lock is renamed
aside (atomic) and removed only if it is still the one judged gone, else put back.
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from megatron_sdmoe.errors import UserError, writing_into

LOCK = "run.lock"
HEARTBEAT = 30.0  # seconds between refreshes of the lock's modification time
STALE = 5 * HEARTBEAT  # a lock of another host not refreshed for this long is a gone job's
WAIT_OR_STOP = "wait for it to end or stop it, or train in another run.dir"


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text()
    except OSError:
        return None


def _process_start(pid: int) -> str | None:
    """When process `pid` started (clock ticks since boot, /proc/PID/stat); None if it does not run
    (a zombie has ended too) or on a system without /proc."""
    stat = _read(f"/proc/{pid}/stat")
    if stat is None:
        return None
    fields = stat.rpartition(")")[2].split()  # after the command name, which may hold spaces
    return None if fields[0] == "Z" else fields[19]


@dataclass(frozen=True)
class Holder:
    host: str
    boot: str | None  # the host's boot id: a reboot has ended every process
    pid: int
    process_start: str | None  # with the pid, names the process (pids are reused)
    slurm_job: str | None
    since: str
    pid_namespace: str | None = None  # processes of another namespace cannot be looked up by pid

    @classmethod
    def this_process(cls) -> Holder:
        boot = _read("/proc/sys/kernel/random/boot_id")
        try:
            namespace = os.readlink("/proc/self/ns/pid")
        except OSError:  # no /proc
            namespace = None
        return cls(socket.gethostname(), boot and boot.strip(), os.getpid(), _process_start(os.getpid()),
                   os.environ.get("SLURM_JOB_ID"), time.strftime("%Y-%m-%d %H:%M:%S"), namespace)

    def describe(self) -> str:
        job = f", SLURM job {self.slurm_job}" if self.slurm_job else ""
        return f"the training job on host {self.host} (pid {self.pid}{job}, since {self.since})"

    def gone(self, quiet_seconds: float) -> str | None:
        """Why this holder no longer runs, or None if it may (`quiet_seconds`: since its last heartbeat)."""
        me = Holder.this_process()
        if self.slurm_job and self.slurm_job == me.slurm_job:
            return f"an earlier run of this SLURM job ({self.slurm_job})"
        if self.host == me.host and self.boot != me.boot:
            return "its host has restarted since"
        if self.host == me.host and self.pid_namespace == me.pid_namespace:
            if self.pid == me.pid or not _running(self.pid, self.process_start):
                return "its process has ended"
            return None
        return f"no heartbeat for {quiet_seconds:.0f} s" if quiet_seconds > STALE else None


def _running(pid: int, process_start: str | None) -> bool:
    if process_start is not None:
        return _process_start(pid) == process_start
    try:  # no /proc where the lock was written
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def _lock_file(run_dir: Path) -> tuple[str | None, float] | None:
    """run_dir's lock as read now: its text (None: unreadable) and the seconds since its last
    heartbeat; None without a lock."""
    path = Path(run_dir) / LOCK
    try:
        quiet = time.time() - path.stat().st_mtime
    except OSError:  # none (or run.dir is no directory: taking the lock says so)
        return None
    try:
        return path.read_text(), quiet
    except FileNotFoundError:  # released this moment
        return None
    except OSError:
        return None, quiet


def _holder(text: str | None) -> Holder | None:
    try:
        return Holder(**json.loads(text)) if text is not None else None
    except (ValueError, TypeError):  # being written this moment, or left torn by a crash
        return None


def current_holder(run_dir: Path) -> tuple[Holder | None, float] | None:
    """The holder of run_dir's lock (None: unreadable, as while it is being written) and the seconds
    since its last heartbeat; None without a lock."""
    found = _lock_file(run_dir)
    return None if found is None else (_holder(found[0]), found[1])


def _state(text: str | None, quiet: float) -> tuple[str, str | None]:
    """Whose lock `text` is and, if that job is gone, why (None: it may run)."""
    holder = _holder(text)
    if holder is None:  # being written this moment, or left torn by a crash long ago
        return (f"a job whose {LOCK} cannot be read (it may be being written)",
                f"unchanged for {quiet:.0f} s" if quiet > STALE else None)
    return holder.describe(), holder.gone(quiet)


def lock_state(run_dir: Path) -> tuple[str, str | None] | None:
    """None if run_dir has no lock; else whose it is and, if that job is gone, why (None: it may run)."""
    found = _lock_file(run_dir)
    return None if found is None else _state(*found)


def running_job(run_dir: Path) -> str | None:
    """Who holds run_dir's lock, if that job may still run."""
    state = lock_state(run_dir)
    return state[0] if state and state[1] is None else None


def check_free(run_dir: Path, fix: str) -> str | None:
    """None if run_dir has no lock; if its holder is gone, whose it was and why; refused (UserError,
    naming the holder and then `fix`) while that may still run."""
    state = lock_state(run_dir)
    return None if state is None else _gone_or_refused(run_dir, *state, fix)


def _gone_or_refused(run_dir: Path, whose: str, gone: str | None, fix: str) -> str:
    if gone is None:
        raise UserError(f"run.dir {run_dir} is in use by {whose}: {fix}; if that job is gone, "
                        f"remove {Path(run_dir) / LOCK}")
    return f"{whose}: {gone}"


class RunLock:
    """run.dir's lock for the life of a training job: `acquire()` on rank 0 once the config has passed
    its checks, released on leaving the `with` block, whatever ends it."""

    def __init__(self, run_dir: Path):
        self.run_dir, self.path = Path(run_dir), Path(run_dir) / LOCK
        self.holder: Holder | None = None
        self._stop = threading.Event()

    def acquire(self) -> str | None:
        """Take the lock; returns a line when a gone job's lock was taken over. Refused (UserError)
        while a live job holds it."""
        found = _lock_file(self.run_dir)
        gone = found and _gone_or_refused(self.run_dir, *_state(*found), WAIT_OR_STOP)
        me = Holder.this_process()
        with writing_into(self.run_dir):
            if gone:
                self._remove_gone(found[0])
            self.run_dir.mkdir(parents=True, exist_ok=True)
            try:  # O_EXCL: of two starts, one creates it
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                raise self._taken() from None
            with os.fdopen(fd, "w") as f:
                json.dump(asdict(me), f)
        self.holder = me
        threading.Thread(target=self._beat, name="run.lock heartbeat", daemon=True).start()
        return f"run.dir {self.run_dir}: took over {LOCK} from {gone}" if gone else None

    def _remove_gone(self, text: str | None) -> None:
        """Remove the lock judged gone when it read `text`, unless another start has just replaced
        it: renamed aside first (atomic, so of several starts one moves it), then compared."""
        aside = self.path.with_name(f"{LOCK}.{socket.gethostname()}.{os.getpid()}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:  # another start moved it: creating the lock decides between us
            return
        if _read(str(aside)) != text:  # a lock taken this moment, not the gone one: put it back
            os.rename(aside, self.path)
            raise self._taken()
        aside.unlink()

    def _taken(self) -> UserError:
        return UserError(f"run.dir {self.run_dir} was taken by another job starting at the same moment: "
                         "train in another run.dir, or start again once it has ended")

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT):
            try:
                os.utime(self.path)
            except OSError:  # a filesystem hiccup: the next beat tries again
                pass

    def release(self) -> None:
        """Remove the lock if this process holds it (and nobody has taken it over)."""
        if self.holder is None:
            return
        self._stop.set()
        found = current_holder(self.run_dir)
        if found is not None and found[0] == self.holder:
            self.path.unlink(missing_ok=True)
        self.holder = None

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()
