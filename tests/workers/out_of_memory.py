"""The real entry point running out of memory: OUT_OF_MEMORY=gpu: step 2 raises the error torch
raises when a GPU's memory runs out (there is no GPU here to fill); host: building the model asks
torch's CPU allocator for a petabyte, which it cannot give."""
import os
import sys

import torch

from megatron_sdmoe import train
from megatron_sdmoe.training.loop import Trainer

if __name__ == "__main__":
    if os.environ.get("OUT_OF_MEMORY", "gpu") == "gpu":
        step = Trainer.train_step

        def out_of_memory_at_step_2(self, index: int):
            if index == 1:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total "
                                             "capacity of 79.19 GiB of which 1.05 GiB is free.\nmore detail")
            return step(self, index)

        Trainer.train_step = out_of_memory_at_step_2
    else:
        build = train.build_model
        train.build_model = lambda *args, **kwargs: (torch.empty(2 ** 50, dtype=torch.uint8), build(*args, **kwargs))[1]
    train.main(sys.argv[1:])
