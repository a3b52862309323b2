"""Trains through the real setup path, then checks parameter replicas across ranks.

Prints one line `REPLICAS {json}` on rank 0: dense parameters identical on every data-parallel
rank, each expert identical across its expert-data-parallel replicas, different experts on
different expert-parallel ranks.
"""
import json
import sys

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from megatron_sdmoe.runtime import shutdown
from megatron_sdmoe.training.engine import is_expert_param
from tests.workers import training_session


def gathered(tensor: torch.Tensor, group) -> list[torch.Tensor]:
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, tensor.contiguous(), group=group)
    return parts


def main() -> None:
    session = training_session(sys.argv[1:])
    session.trainer.run(session.start_step)
    checks = {"dense_identical_over_dp": True, "experts_identical_over_expert_dp": True,
              "experts_differ_over_ep": True, "dense_params": 0, "expert_params": 0}
    for _, param in session.engine.module.named_parameters():
        data = param.detach()
        if is_expert_param(param):
            checks["expert_params"] += 1
            replicas = gathered(data, ps.get_expert_data_parallel_group())
            checks["experts_identical_over_expert_dp"] &= all(torch.equal(replicas[0], r) for r in replicas)
            others = gathered(data, ps.get_expert_model_parallel_group())
            checks["experts_differ_over_ep"] &= all(
                not torch.equal(others[i], others[j]) for i in range(len(others)) for j in range(i))
        else:
            checks["dense_params"] += 1
            replicas = gathered(data, ps.get_data_parallel_group())
            checks["dense_identical_over_dp"] &= all(torch.equal(replicas[0], r) for r in replicas)
    flags = torch.tensor([int(checks[k]) for k in sorted(checks)], dtype=torch.float64)
    dist.all_reduce(flags, op=dist.ReduceOp.MIN)
    if dist.get_rank() == 0:
        print("REPLICAS " + json.dumps(dict(zip(sorted(checks), flags.tolist()))), flush=True)
    shutdown()


if __name__ == "__main__":
    main()
