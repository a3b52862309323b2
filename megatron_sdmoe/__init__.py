"""megatron_sdmoe: Mixture-of-Experts pretraining on megatron-core expert parallelism + DeepSpeed ZeRO."""
import logging
import os
import warnings

import torch

# DeepSpeed's ZeRO calls torch.distributed.all_gather_into_tensor, which torch deprecates: a warning
# on every rank about code that is DeepSpeed's to change.
warnings.filterwarnings("ignore", message="`torch.distributed.all_gather_into_tensor` is deprecated",
                        category=FutureWarning)
if not torch.cuda.is_available():
    # DeepSpeed picks its accelerator once, when first asked; without CUDA it must be the CPU one.
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    # Notes that are expected without CUDA: no Transformer Engine / Apex, no CUDA runtime.
    warnings.filterwarnings("ignore", message=".*Apex (is|are) not installed")
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
