"""What each start of a run ran on, one JSON line per start in <run.dir>/starts.jsonl (rank 0
appends it): the time, the step it started from, the layout and precision, every rank's host and
device, the SLURM job, the versions of the stack and this project's git commit. A change in the
loss or the speed can then be set against a requeue onto other nodes or a new container."""
from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
from collections import Counter
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_sdmoe.errors import writing_into
from megatron_sdmoe.runtime import Layout
from megatron_sdmoe.runtime.agreement import agreed

STARTS = "starts.jsonl"
PACKAGES = ("megatron-sdmoe", "torch", "megatron-core", "deepspeed", "transformers")
REPO = Path(__file__).resolve().parents[2]  # the source tree (a git checkout, or an installed copy)


def record_start(run_dir: Path, layout: Layout, start_step: int, dtype: torch.dtype) -> None:
    """Every rank's host and device, gathered; rank 0 appends the start's line."""
    device = torch.cuda.get_device_name(layout.device) if layout.device.type == "cuda" else layout.device.type
    ranks = [None] * dist.get_world_size()
    dist.all_gather_object(ranks, (socket.gethostname(), device))
    entry = {"time": datetime.now(timezone.utc).isoformat(timespec="seconds"), "start_step": start_step,
             "world_size": layout.world_size, "tensor": layout.tensor, "expert": layout.expert,
             "expert_tensor": layout.expert_tensor, "data_parallel": layout.data_parallel,
             "precision": str(dtype).removeprefix("torch."),
             "hosts": dict(Counter(host for host, _ in ranks)), "devices": dict(Counter(name for _, name in ranks)),
             "slurm_job_id": os.environ.get("SLURM_JOB_ID"), "versions": versions(), "commit": commit()}
    agreed(lambda: _append(run_dir / STARTS, entry) if layout.is_main else None)


def versions() -> dict[str, str | None]:
    def version(package: str) -> str | None:
        try:
            return metadata.version(package)
        except metadata.PackageNotFoundError:
            return None

    return {"python": platform.python_version(), "cuda": torch.version.cuda,
            **{package: version(package) for package in PACKAGES}}


def commit() -> str | None:
    """This project's git commit, `+dirty` with uncommitted changes to tracked files; None outside
    its own checkout (an installed copy, which may sit inside another repository) or without git."""
    if not (REPO / ".git").exists():
        return None
    try:
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return None
    return head.stdout.strip() + ("+dirty" if dirty else "")


def _append(path: Path, entry: dict) -> None:
    with writing_into(path.parent), open(path, "a") as f:
        f.write(json.dumps(entry) + "\n")
