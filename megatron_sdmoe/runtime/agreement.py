"""Bad input that only some ranks see, made every rank's error.

On a cluster, ranks on different nodes can see different files: a node without the data, a run.dir
on a node-local disk, a relative path resolved in another working directory. A rank that raised
alone would exit without a word (only the first rank prints errors) while the others wait in their
next collective. So start-up steps that read or write files run under `agreed`: every rank learns
of the first rank's error and raises it, and the one printed line names the rank and host.
"""
from __future__ import annotations

import secrets
import socket
from pathlib import Path
from typing import Callable, TypeVar

import torch.distributed as dist

from megatron_sdmoe.errors import UserError, seen_on, writing_into

T = TypeVar("T")


def agreed(step: Callable[[], T]) -> T:
    """`step()` on every rank (it must not use collectives); if it raises UserError on any rank, the
    first such rank's error is raised on all of them."""
    try:
        result, error = step(), None
    except UserError as e:
        result, error = None, str(e)
    world = dist.get_world_size()
    reports = [None] * world
    dist.all_gather_object(reports, (error, socket.gethostname()))
    failed = [(rank, message, host) for rank, (message, host) in enumerate(reports) if message]
    if failed:
        rank, message, host = failed[0]
        where = "" if len(failed) == world else seen_on(rank, world, host)
        raise UserError(message + where)
    return result


def check_shared_directory(directory: Path, setting: str) -> None:
    """Refuse a directory that is not the same one on every rank (every rank writes checkpoint
    shards into run.dir and reads the index cache rank 0 builds): rank 0 writes a stamp file into
    it, and every rank must read it back."""
    if dist.get_world_size() == 1:
        return
    token = [secrets.token_hex(8)]
    dist.broadcast_object_list(token, src=0)
    stamp = directory / f".shared-check-{token[0]}"
    first = dist.get_rank() == 0
    agreed(lambda: _write_stamp(stamp, setting) if first else None)
    try:
        agreed(lambda: _read_stamp(stamp, setting))
    finally:
        if first:
            stamp.unlink(missing_ok=True)


def _write_stamp(stamp: Path, setting: str) -> None:
    with writing_into(stamp.parent, setting):
        stamp.parent.mkdir(parents=True, exist_ok=True)
        stamp.write_text(stamp.name)


def _read_stamp(stamp: Path, setting: str) -> None:
    try:
        seen = stamp.read_text()
    except OSError:
        seen = None
    if seen != stamp.name:
        raise UserError(f"{setting}={stamp.parent} is not one directory shared by every rank (a node-local disk, "
                        f"or a relative path resolved in another working directory): set {setting} to an "
                        "absolute path on a filesystem that every node mounts")
