"""The real entry point, saying at exit whether the process group was still alive then: it must
not be, after an error as after a finished run (runtime/distributed.py)."""
import atexit
import sys

import torch.distributed as dist

from megatron_sdmoe import train

if __name__ == "__main__":
    # registered before the entry point's own exit handlers, so it runs after them
    atexit.register(lambda: print(f"process group alive at exit: {dist.is_initialized()}", flush=True))
    train.main(sys.argv[1:])
