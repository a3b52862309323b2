"""The real entry point with rank FULL_RANK unable to write a file beyond FILE_SIZE_LIMIT bytes
(RLIMIT_FSIZE, as a full disk or a quota refuses a write: the write fails with an OSError; the
signal the limit would send is ignored), the other ranks as usual."""
import os
import resource
import signal
import sys

from megatron_sdmoe import train

if __name__ == "__main__":
    if os.environ["RANK"] == os.environ["FULL_RANK"]:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        limit = int(os.environ["FILE_SIZE_LIMIT"])
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
    train.main(sys.argv[1:])
