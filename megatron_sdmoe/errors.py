"""The one error type users see: bad input (config, data, checkpoint, parallel layout).

Entry points print its message as a single line and exit with code 2.
"""
import argparse
import errno
import math
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import NoReturn

EXIT_BAD_INPUT = 2
FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}  # a full disk, a quota, a file size limit


class UserError(Exception):
    """Bad input that the user can fix; the message names the problem and the fix."""


class RankError(UserError):
    """Bad input that one rank meets alone (in the samples it reads): that rank prints it."""


def seen_on(rank: int, world: int, host: str) -> str:
    """Where an error one rank met was seen, for its line."""
    return f" [seen on rank {rank} of {world}, host {host}]"


def exit_bad_input(error: UserError) -> NoReturn:
    """The one line, and exit code 2. Every rank of a job meets the same bad input, so the first
    rank prints it; a RankError is the raising rank's own, so that rank does."""
    if isinstance(error, RankError) or os.environ.get("RANK", "0") == "0":
        print(f"error: {error}", file=sys.stderr, flush=True)
    sys.exit(EXIT_BAD_INPUT)


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser whose errors (a missing argument, a bad number) are one line and exit
    code 2 like every other bad input, printed by the first rank only, instead of the usage block."""

    def error(self, message: str):
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {message}: see {self.prog} --help", file=sys.stderr, flush=True)
        sys.exit(EXIT_BAD_INPUT)


def positive_int(value: str) -> int:
    """An argparse type: a count of at least 1."""
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"{value!r} is not a positive integer")
    return int(value)


def positive_number(value: str) -> float:
    """An argparse type: a finite number above 0."""
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not math.isfinite(number) or number <= 0:
        raise argparse.ArgumentTypeError(f"{value!r} is not a positive number")
    return number


@contextmanager
def writing_into(directory: Path, setting: str = "run.dir"):
    """Turn a failure to write into `directory` (the value of `setting`) into the one-line error."""
    try:
        yield
    except OSError as e:
        if e.errno in FULL:
            raise UserError(f"writing into {setting} {directory} failed ({e.strerror}): free space or quota there, "
                            "then start again") from e
        raise UserError(f"{setting} {directory} is not writable ({e.strerror}): choose another {setting}") from e


def out_of_memory_line(rank: int, error: Exception, fix: str, memory: str = "GPU") -> str:
    """The one line for a rank that ran out of `memory` (that rank prints it: the launcher ends the others)."""
    first = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return f"error: rank {rank} ran out of {memory} memory ({first}): {fix}"


def out_of_host_memory(error: BaseException) -> bool:
    """Python's MemoryError, or torch's CPU allocator failing (a RuntimeError of its own words)."""
    return isinstance(error, MemoryError) or (isinstance(error, RuntimeError)
                                              and "DefaultCPUAllocator: can't allocate memory" in str(error))
