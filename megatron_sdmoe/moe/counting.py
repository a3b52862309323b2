"""Sparse counts of routing events (a route and a label, an expert and a token), summed over ranks
at any scale.

Each rank counts the events of its own tokens. Gathering every rank's counts to every rank would
make each rank receive the whole cluster's counts, world size times over (at hundreds of GPUs,
gigabytes per diagnostics step). Instead an all-to-all sends each distinct key to the one rank that
owns it (by a hash), which sums it: every rank sends and receives about its own share, and ends
with the whole count of the keys it owns. Statistics that add up over keys are then summed over
ranks as a few numbers; a report that needs every key gathers the summed counts on one rank.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist

Counts = tuple[torch.Tensor, torch.Tensor]  # (distinct int64 keys [n, w], how often each [n]), on the CPU


def counted(keys: torch.Tensor) -> Counts:
    """keys [n, w] -> each distinct row and how often it occurs."""
    distinct, counts = torch.unique(keys, dim=0, return_counts=True)
    return distinct.cpu(), counts.cpu()


def merged(parts: list[Counts], width: int) -> Counts:
    """The counts of several (keys [n, width], counts) summed per key."""
    if not parts:
        return torch.zeros(0, width, dtype=torch.int64), torch.zeros(0, dtype=torch.int64)
    keys, inverse = torch.unique(torch.cat([k for k, _ in parts]), dim=0, return_inverse=True)
    return keys, torch.zeros(len(keys), dtype=torch.int64).index_add_(0, inverse, torch.cat([c for _, c in parts]))


def mixed(words: torch.Tensor) -> torch.Tensor:
    """A hash of each row of int64 words [n, w] (FNV-like, wrapping), to spread keys over ranks
    (a route's bit mask alone would send every route with expert 0 to the same rank)."""
    hashed = torch.zeros(len(words), dtype=torch.int64)
    for column in words.T:
        hashed = (hashed ^ column) * 1099511628211
        hashed = hashed ^ (hashed >> 29)
    return hashed


def owned_sums(parts: list[Counts], width: int, owner_of: Callable[[torch.Tensor], torch.Tensor]) -> Counts:
    """This rank's counts (several parts) summed over every rank, for the keys this rank owns
    (`owner_of`: keys [n, width] -> an int64 per key, taken modulo the world size); a collective."""
    keys, counts = merged(parts, width)
    world = dist.get_world_size()
    owners = owner_of(keys) % world
    order = torch.argsort(owners, stable=True)
    payload = torch.cat([keys, counts[:, None]], dim=1)[order].to(device())
    sent = torch.bincount(owners, minlength=world).to(device())
    received = torch.empty_like(sent)
    dist.all_to_all_single(received, sent)
    arrived = payload.new_empty(int(received.sum()), width + 1)
    dist.all_to_all_single(arrived, payload, received.tolist(), sent.tolist())
    arrived = arrived.cpu()
    return merged([(arrived[:, :-1], arrived[:, -1])], width)


def on_first_rank(counts: list[Counts]) -> list[Counts] | None:
    """Counts whose keys each rank owns alone, all of them on rank 0 (None elsewhere); a collective."""
    parts = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(counts, parts, dst=0)
    if parts is None:
        return None
    return [merged([rank[i] for rank in parts], keys.shape[1]) for i, (keys, _) in enumerate(counts)]


def summed(values: list[list[float]]) -> list[list[float]]:
    """Each rank's partial sums [items][terms], summed over every rank (float64); a collective."""
    total = torch.tensor(values, dtype=torch.float64, device=device())
    dist.all_reduce(total)
    return total.cpu().tolist()


def device() -> torch.device:
    """This rank's GPU, else the CPU: where its collectives (NCCL, gloo) take tensors."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
