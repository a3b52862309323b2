"""Run under torchrun (or alone) in a run directory: restore its latest checkpoint through the
training setup and write the model's logits on fixed tokens (gathered over TP's vocabulary split)
to the file named by the last argument."""
import sys

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from megatron_sdmoe.runtime import shutdown
from megatron_sdmoe.runtime.distributed import all_gathered
from tests.workers import training_session

TOKENS = torch.randint(0, 1000, (2, 48), generator=torch.Generator().manual_seed(0))


def main() -> None:
    *args, out = sys.argv[1:]
    session = training_session(args)
    model = session.engine.module.eval()
    tokens = TOKENS.to(session.layout.device)
    with torch.no_grad():
        logits = model(tokens, torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens), None)
    group = ps.get_tensor_model_parallel_group()
    gathered = all_gathered(logits, group, dim=-1)
    if dist.get_rank() == 0:
        torch.save(gathered.cpu(), out)
    shutdown()


if __name__ == "__main__":
    main()
