"""Trains SD-MoE through the real setup path (DeepSpeed ZeRO, AdamW) within one refresh interval
and prints `COMPLEMENT {json}` on rank 0: the largest relative part of any unique matrix's change
that lies outside the two-sided complement of its (unchanged) common basis. The change is read from
DeepSpeed's fp32 master weights: in bf16 the model's weights are their rounding."""
import json
import sys

import torch
import torch.distributed as dist
from deepspeed.utils import safe_get_full_fp32_param

from megatron_sdmoe.moe.experts import by_projection
from megatron_sdmoe.moe.sdmoe import complement, sdmoe_modules
from megatron_sdmoe.runtime import shutdown
from tests.workers import training_session


def main() -> None:
    session = training_session(sys.argv[1:])
    assert session.cfg.train.max_steps <= session.cfg.sdmoe.refresh_interval, "stay within one refresh interval"
    layers = sdmoe_modules(session.engine.module)
    before = [master_uniques(layer) for layer in layers]
    session.trainer.run(session.start_step)
    worst, smallest_change = 0.0, float("inf")
    for layer, old in zip(layers, before):
        for proj, unique in master_uniques(layer).items():
            delta = unique - old[proj]
            q, v = (basis.float() for basis in layer.expert_basis(proj))
            inside = complement(delta, q, v, layer.shards[proj])
            worst = max(worst, ((delta - inside).norm() / delta.norm()).item())
            smallest_change = min(smallest_change, delta.norm().item())
    result = torch.tensor([worst, -smallest_change], dtype=torch.float64)
    dist.all_reduce(result, op=dist.ReduceOp.MAX)
    if dist.get_rank() == 0:
        print("COMPLEMENT " + json.dumps({"off_complement": result[0].item(), "min_change": -result[1].item()}))
    shutdown()


def master_uniques(layer) -> dict[str, torch.Tensor]:
    return by_projection(safe_get_full_fp32_param(layer.linear_fc1), safe_get_full_fp32_param(layer.linear_fc2))


if __name__ == "__main__":
    main()
