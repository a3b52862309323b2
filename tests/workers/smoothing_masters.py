"""Trains through the real setup path and prints `SPECTRA {json}` on rank 0: over every matrix that
smoothing touches, read whole (gathered over TP) from DeepSpeed's fp32 master weights, the
smallest and largest sigma_2 / sigma_1, and the largest difference between a master and the
model's weight. A matrix smoothed at the last step has a flat top (sigma_2 = sigma_1)."""
import json
import sys

import torch
import torch.distributed as dist
from deepspeed.utils import safe_get_full_fp32_param

from megatron_sdmoe.runtime import shutdown
from megatron_sdmoe.training.smoothing import SingularitySmoother
from tests.workers import training_session


def main() -> None:
    session = training_session(sys.argv[1:])
    cfg = session.cfg
    session.trainer.run(session.start_step)
    ratios, differences = [], []
    for param, shards in SingularitySmoother(cfg.smoothing, session.engine.module, session.layout.device, None).matrices:
        master = safe_get_full_fp32_param(param)
        s = torch.linalg.svdvals(shards.gather(master).double())
        ratios.append((s[..., 1] / s[..., 0]).flatten())
        differences.append((master - param.float()).abs().max())
    ratios = torch.cat(ratios)
    result = torch.stack([-ratios.min(), ratios.max(), torch.stack(differences).max().double()])
    dist.all_reduce(result, op=dist.ReduceOp.MAX)
    if dist.get_rank() == 0:
        print("SPECTRA " + json.dumps({"min_top_ratio": -result[0].item(), "max_top_ratio": result[1].item(),
                                       "max_master_difference": result[2].item()}))
    shutdown()


if __name__ == "__main__":
    main()
