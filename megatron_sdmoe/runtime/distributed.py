"""Distributed start-up: process group, megatron-core parallel groups, seeding, shutdown.

The same code runs as one plain process, under torchrun / the deepspeed launcher (RANK,
WORLD_SIZE, MASTER_ADDR, MASTER_PORT, LOCAL_RANK set), and on the cluster. Backend: nccl with
CUDA, gloo without (then the CPU compatibility layer is applied first).
"""
from __future__ import annotations

import atexit
import os
import random
import socket
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from megatron_sdmoe.runtime import cpu_compat


@dataclass(frozen=True)
class Layout:
    """Where this process sits in the parallel layout."""

    rank: int
    world_size: int
    tensor: int
    expert: int
    expert_tensor: int
    data_parallel: int  # dense data-parallel size = world / tensor
    data_parallel_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank_from_env() -> int:
    return int(os.environ.get("RANK", "0"))


def init_distributed(tensor: int, expert: int, expert_tensor: int) -> Layout:
    """Start the process group and megatron-core's tensor / expert / data-parallel groups."""
    cpu_compat.apply()
    cuda = torch.cuda.is_available()
    if "RANK" not in os.environ:  # a plain single process: rendezvous with itself
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))
    device = None
    if cuda:
        # Before CUDA's first use: MoE's token buffers change size every step, which fragments the
        # caching allocator's fixed blocks; expandable segments grow in place. A user's setting wins.
        if not {"PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF"} & os.environ.keys():
            os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    elif "OMP_NUM_THREADS" not in os.environ:
        # Share the cores among the local ranks: oversubscribed OpenMP threads spin and stall.
        torch.set_num_threads(cores_per_local_rank())
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(minutes=30), device_id=device)
        if not cuda:
            atexit.register(_destroy_gloo_groups)

    from megatron.core import parallel_state as ps

    ps.initialize_model_parallel(tensor_model_parallel_size=tensor, expert_model_parallel_size=expert,
                                 expert_tensor_parallel_size=expert_tensor)
    return Layout(rank=dist.get_rank(), world_size=dist.get_world_size(), tensor=tensor, expert=expert,
                  expert_tensor=expert_tensor, data_parallel=ps.get_data_parallel_world_size(),
                  data_parallel_rank=ps.get_data_parallel_rank(),
                  device=torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu"))


def cores_per_local_rank() -> int:
    """This process's share of the cores it may run on, split evenly among the ranks of its machine."""
    # torchrun's name, the deepspeed launcher's, or (neither: one machine) the world size
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", os.environ.get("WORLD_SIZE", "1"))))
    return max(1, len(os.sched_getaffinity(0)) // local_ranks)


def all_gathered(tensor: torch.Tensor, group, dim: int = 0) -> torch.Tensor:
    """`tensor` of every rank of `group`, concatenated along `dim` in rank order (no autograd)."""
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, tensor.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def seed_everything(seed: int) -> None:
    """Seed Python, numpy, torch and megatron-core's named RNG states (dropout, experts)."""
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)


def shutdown() -> None:
    from megatron.core import parallel_state as ps

    if dist.is_initialized():
        dist.barrier()
        ps.destroy_model_parallel()
        dist.destroy_process_group()


def _destroy_gloo_groups() -> None:
    """At exit without shutdown() (an error): gloo's worker threads, if left to interpreter
    finalization, can abort the process (SIGABRT, exit 134, after the error line: pytorch PR
    179291). NCCL groups are left alone: destroying them while other ranks wait in a collective
    can hang."""
    if dist.is_initialized():
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
