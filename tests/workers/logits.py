"""Run under torchrun (or alone) in a run directory: restore its latest checkpoint through the
training setup and write the model's logits on fixed tokens (gathered over TP's vocabulary split)
to the file named by the last argument."""
import sys

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from megatron_sdmoe.config import load_config
from megatron_sdmoe.runtime import shutdown
from megatron_sdmoe.runtime.distributed import world_size_from_env
from megatron_sdmoe.train import setup
from megatron_sdmoe.validation import validate

TOKENS = torch.randint(0, 1000, (2, 48), generator=torch.Generator().manual_seed(0))


def main() -> None:
    *args, out = sys.argv[1:]
    cfg = load_config(args[0], args[1:])
    validate(cfg, world_size_from_env())
    session = setup(cfg)
    model = session.engine.module.eval()
    tokens = TOKENS.to(session.layout.device)
    with torch.no_grad():
        logits = model(tokens, torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens), None)
    group = ps.get_tensor_model_parallel_group()
    parts = [torch.empty_like(logits) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, logits.contiguous(), group=group)
    if dist.get_rank() == 0:
        torch.save(torch.cat(parts, dim=-1).cpu(), out)
    shutdown()


if __name__ == "__main__":
    main()
