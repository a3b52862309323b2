"""Expert capacity with `moe.token_drop_policy: position` keeping each expert's earliest tokens.

megatron-core 0.19.2 (moe_utils.apply_router_token_dropping) picks the tokens an expert keeps with
torch.topk over the expert's 0/1 routing column: every routed token ties at 1, and torch.topk does
not say which tied entries it returns (on the CPU they are not the earliest). Ranking the column
by position instead makes an expert keep its first `capacity` routed tokens, as the policy's name
and megatron-core's documentation say ("position" drops the tokens at the end of the batch).
"""
from __future__ import annotations

import torch
from megatron.core.transformer.moe import moe_utils, router

_megatron_token_dropping = moe_utils.apply_router_token_dropping


def apply_router_token_dropping(routing_probs: torch.Tensor, routing_map: torch.Tensor, router_topk: int,
                                capacity_factor: float, drop_policy: str = "probs",
                                pad_to_capacity: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    if drop_policy != "position":
        return _megatron_token_dropping(routing_probs, routing_map, router_topk, capacity_factor, drop_policy,
                                        pad_to_capacity)
    # megatron-core's "probs" policy on scores that rank an expert's routed tokens first to last
    first_to_last = torch.arange(routing_map.shape[0], 0, -1, device=routing_map.device)[:, None]
    _, kept = _megatron_token_dropping(routing_map * first_to_last, routing_map, router_topk, capacity_factor,
                                       "probs", pad_to_capacity)
    return routing_probs * kept, kept


def use_in_megatron_router() -> None:
    """megatron-core's TopKRouter calls the name its module imported: this function from now on."""
    router.apply_router_token_dropping = apply_router_token_dropping
