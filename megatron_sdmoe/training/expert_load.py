"""Tokens routed to each expert, per MoE layer, counted from the routers' decisions."""
from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core.transformer.moe.router import TopKRouter

from megatron_sdmoe.moe.counting import device


class ExpertLoadMeter:
    """Forward hooks on every router add up its routing map while the model trains.

    Each token is routed on exactly one rank (sequence parallelism splits tokens over TP, data
    parallelism over DP), so the sum over all ranks is the global load.
    """

    def __init__(self, model: torch.nn.Module, saved: list | None = None):
        """`saved`: state() as a checkpoint holds it (the counts since the last logged step)."""
        self.routers = [m for m in model.modules() if isinstance(m, TopKRouter)]
        num_experts = self.routers[0].config.num_moe_experts if self.routers else 0
        # On the routers' device, so counting adds no host sync to the training step.
        self.counts = torch.zeros(len(self.routers), num_experts, dtype=torch.float64, device=device())
        self.tokens = torch.zeros(len(self.routers), dtype=torch.float64, device=device())  # routed, per router
        if saved and dist.get_rank() == 0:  # summed over ranks: one rank holds them
            counts = torch.tensor(saved, dtype=torch.float64, device=device())
            self.counts, self.tokens = counts[:, :-1].contiguous(), counts[:, -1].contiguous()
        for index, router in enumerate(self.routers):
            router.register_forward_hook(self._hook(index))

    def _hook(self, index: int):
        def count(module, _inputs, output):
            if module.training and torch.is_grad_enabled():  # once per micro-batch, also when recomputed
                _probs, routing_map = output
                self.counts[index] += routing_map.sum(dim=0).to(self.counts)
                self.tokens[index] += routing_map.shape[0]
        return count

    def state(self) -> list:
        """The counts since the last collect, summed over ranks, per router [experts + tokens] (a collective)."""
        counts = torch.cat([self.counts, self.tokens[:, None]], dim=1)
        dist.all_reduce(counts)
        return counts.tolist()

    def collect(self, per_expert: bool = False) -> dict[str, list]:
        """Per MoE layer since the last call (a collective): the busiest expert's tokens over the
        mean (1.0 = perfectly balanced) and the fraction of routed (token, expert) pairs that
        expert capacity dropped (0 when dropless); with `per_expert`, also `expert_load`: each
        expert's share of the layer's routings."""
        counts = torch.cat([self.counts, self.tokens[:, None]], dim=1)
        self.counts.zero_()
        self.tokens.zero_()
        dist.all_reduce(counts)
        counts, tokens = counts[:, :-1].cpu(), counts[:, -1].cpu()
        topk = self.routers[0].topk if self.routers else 1
        result = {"expert_load_max_over_mean": (counts.max(dim=1).values / counts.mean(dim=1).clamp_min(1e-9)).tolist(),
                  "expert_dropped_fraction": (1 - counts.sum(dim=1) / (tokens * topk).clamp_min(1)).tolist()}
        if per_expert:
            result["expert_load"] = (counts / counts.sum(dim=1, keepdim=True).clamp_min(1)).tolist()
        return result
