"""moe/counting.py on real ranks (gloo): each rank counts its own random two-word keys, then sums
them over ranks by owner; writes `counts_<rank>.pt` into the folder given: its input, the keys it
owns after the exchange, what rank 0 gathers and the summed partial sums."""
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_sdmoe.moe.counting import counted, mixed, on_first_rank, owned_sums, summed

if __name__ == "__main__":
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    generator = torch.Generator().manual_seed(rank)
    parts = [counted(torch.randint(0, 6, (n, 2), generator=generator)) for n in (50, 0, 30)]  # an empty part too
    owned = owned_sums(parts, 2, mixed)
    torch.save({"parts": parts, "owned": owned, "first": on_first_rank([owned]),
                "summed": summed([[1.0, rank], [0.5, 2.0]])}, Path(sys.argv[1]) / f"counts_{rank}.pt")
    dist.destroy_process_group()
