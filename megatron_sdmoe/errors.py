"""The one error type users see: bad input (config, data, checkpoint, parallel layout).

Entry points print its message as a single line and exit with code 2.
"""
import errno
from contextlib import contextmanager
from pathlib import Path

EXIT_BAD_INPUT = 2
FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}  # a full disk, a quota, a file size limit


class UserError(Exception):
    """Bad input that the user can fix; the message names the problem and the fix."""


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


def out_of_memory_line(rank: int, error: Exception, fix: str) -> str:
    """The one line for a rank that ran out of GPU memory (that rank prints it: the launcher ends the others)."""
    return f"error: rank {rank} ran out of GPU memory ({str(error).splitlines()[0]}): {fix}"
