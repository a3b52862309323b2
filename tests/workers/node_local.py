"""The real entry point with each rank in a working directory of its own (RANK_DIRS/rank<r>), as
ranks on different nodes see different node-local disks: a relative path names another file on
each rank."""
import os
import sys
from pathlib import Path

from megatron_sdmoe import train

if __name__ == "__main__":
    home = Path(os.environ["RANK_DIRS"]) / f"rank{os.environ['RANK']}"
    home.mkdir(parents=True, exist_ok=True)
    os.chdir(home)
    train.main(sys.argv[1:])
