"""The real entry point whose step 2 raises the error torch raises when a GPU's memory runs out
(there is no GPU here to fill)."""
import sys

import torch

from megatron_sdmoe import train
from megatron_sdmoe.training.loop import Trainer

if __name__ == "__main__":
    step = Trainer.train_step

    def out_of_memory_at_step_2(self, index: int):
        if index == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total "
                                         "capacity of 79.19 GiB of which 1.05 GiB is free.\nmore detail")
        return step(self, index)

    Trainer.train_step = out_of_memory_at_step_2
    train.main(sys.argv[1:])
