"""Head-wise routing (MH-MoE) for Hugging Face transformers: the modelling code of models exported
by megatron_sdmoe's `sdmoe-convert to-hf` with `moe.variant: headwise | headwise_sdmoe`.

transformers has no head-wise MoE class, so `sdmoe-convert` copies this file next to the weights
and names its classes in config.json's `auto_map`; load such a directory with
`AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)`. It needs only torch and
transformers. The model is the family's transformers model (Qwen3-MoE, Qwen2-MoE, DeepSeek-V3)
with every MoE block replaced by `HeadwiseMoeBlock`; shared experts stay the family's own.

`config.headwise` holds the routing: the MoE input [tokens, d] splits into `heads` slices of
width d/H (sub-tokens). bank=per_head: head j's router picks `topk` of its own `experts_per_head`
experts (global ids j * experts_per_head + e), each d/H -> ffn -> d, and the heads' outputs are
summed. bank=shared: a d x d mixing projection first, one router and bank for every sub-token
(experts d/H -> ffn -> d/H), then the heads concatenated and a d x d merge projection. Routing is
megatron-core's (the training side): softmax (over all experts first with `pre_softmax`, else over
the chosen) or sigmoid scores (renormalised over the chosen when topk > 1), group-limited top-k,
an expert bias that steers the choice only, and a scaling factor. A reference implementation for
evaluation: experts run one after another.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    DeepseekV3Config,
    DeepseekV3ForCausalLM,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE
from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

ROUTER_DTYPES = {"fp32": torch.float32, "fp64": torch.float64}


class HeadwiseExpert(nn.Module):
    """A SwiGLU expert reading one head's slice."""

    def __init__(self, in_size: int, ffn: int, out_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(in_size, ffn, bias=False)
        self.up_proj = nn.Linear(in_size, ffn, bias=False)
        self.down_proj = nn.Linear(ffn, out_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class HeadwiseRouter(nn.Module):
    """`banks` routers (one per head, or one for all), each picking top-k of its bank."""

    def __init__(self, routing: dict, width: int):
        super().__init__()
        self.routing = routing
        self.banks = routing["heads"] if routing["bank"] == "per_head" else 1
        self.bank_size = routing["experts_per_head"]
        self.weight = nn.Parameter(torch.empty(self.banks * self.bank_size, width))
        if routing["expert_bias"]:
            self.register_buffer("e_score_correction_bias", torch.zeros(self.banks, self.bank_size))

    def forward(self, sub_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[tokens, heads, d/H] -> (probs, bank-local expert ids), each [tokens, heads, topk]."""
        r = self.routing
        dtype = ROUTER_DTYPES.get(r["router_dtype"], sub_tokens.dtype)
        weight = self.weight.to(dtype).view(self.banks, self.bank_size, -1)
        if self.banks > 1:  # head j's logits from its own slice and its own router
            logits = torch.einsum("nhw,hew->nhe", sub_tokens.to(dtype), weight)
        else:
            logits = sub_tokens.to(dtype) @ weight[0].T
        if r["score_function"] == "sigmoid":
            scores = torch.sigmoid(logits.float())
            choose = scores + self.e_score_correction_bias.float() if r["expert_bias"] else scores
            chosen = self._topk(choose)
            probs = scores.gather(-1, chosen)
            if r["topk"] > 1:
                probs = probs / (probs.sum(-1, keepdim=True) + 1e-20)
        elif r["pre_softmax"]:
            scores = torch.softmax(logits, dim=-1, dtype=torch.float32)
            chosen = self._topk(scores)
            probs = scores.gather(-1, chosen)
        else:
            chosen = self._topk(logits)
            probs = torch.softmax(logits.gather(-1, chosen), dim=-1, dtype=torch.float32)
        return probs * r["scaling_factor"], chosen

    def _topk(self, scores: torch.Tensor) -> torch.Tensor:
        """Top-k ids; with groups, only within the `group_topk` groups whose top (topk / group_topk)
        scores sum highest."""
        k, groups, group_topk = self.routing["topk"], self.routing["num_groups"], self.routing["group_topk"]
        if groups:
            grouped = scores.unflatten(-1, (groups, -1))
            group_scores = grouped.topk(k // group_topk, dim=-1).values.sum(-1)
            keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter(
                -1, group_scores.topk(group_topk, dim=-1).indices, True)
            scores = grouped.masked_fill(~keep.unsqueeze(-1), float("-inf")).flatten(-2)
        return scores.topk(k, dim=-1).indices


class HeadwiseMoeBlock(nn.Module):
    """The head-wise routed experts, plus the family block's shared experts (kept as they are)."""

    def __init__(self, config, family_block: nn.Module):
        super().__init__()
        r, d = config.headwise, config.hidden_size
        self.heads, self.per_head = r["heads"], r["bank"] == "per_head"
        width = d // self.heads
        self.gate = HeadwiseRouter(r, width)
        experts = self.gate.banks * self.gate.bank_size
        self.experts = nn.ModuleList(HeadwiseExpert(width, r["ffn_hidden_size"], d if self.per_head else width)
                                     for _ in range(experts))
        if not self.per_head:
            self.mix_proj, self.merge_proj = nn.Linear(d, d, bias=False), nn.Linear(d, d, bias=False)
        for shared in ("shared_expert", "shared_expert_gate", "shared_experts"):  # Qwen2-MoE's, DeepSeek's
            if hasattr(family_block, shared):
                setattr(self, shared, getattr(family_block, shared))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape, d = hidden_states.shape, hidden_states.shape[-1]
        x = hidden_states.reshape(-1, d)
        moe_input = x if self.per_head else self.mix_proj(x)
        sub_tokens = moe_input.view(len(x), self.heads, d // self.heads)
        probs, chosen = self.gate(sub_tokens)
        if self.per_head:  # bank-local ids -> the layer's
            chosen = chosen + self.gate.bank_size * torch.arange(self.heads, device=chosen.device).unsqueeze(-1)
        rows, probs, chosen = sub_tokens.flatten(0, 1), probs.flatten(0, 1), chosen.flatten(0, 1)
        out = rows.new_zeros(len(rows), self.experts[0].down_proj.out_features)
        for e, expert in enumerate(self.experts):
            row, slot = torch.where(chosen == e)
            if len(row):
                out.index_add_(0, row, expert(rows[row]) * probs[row, slot].unsqueeze(-1).to(out.dtype))
        out = out.view(len(x), self.heads, -1)
        out = out.sum(1) if self.per_head else self.merge_proj(out.flatten(1))
        if hasattr(self, "shared_experts"):
            out = out + self.shared_experts(x)
        if hasattr(self, "shared_expert"):
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out.view(shape)


def use_headwise_blocks(model) -> None:
    for layer in model.model.layers:
        if isinstance(layer.mlp, (Qwen3MoeSparseMoeBlock, Qwen2MoeSparseMoeBlock, DeepseekV3MoE)):
            layer.mlp = HeadwiseMoeBlock(model.config, layer.mlp)


class HeadwiseQwen3MoeConfig(Qwen3MoeConfig):
    model_type = "headwise_qwen3_moe"


class HeadwiseQwen2MoeConfig(Qwen2MoeConfig):
    model_type = "headwise_qwen2_moe"


class HeadwiseDeepseekV3Config(DeepseekV3Config):
    model_type = "headwise_deepseek_v3"


class HeadwiseQwen3MoeForCausalLM(Qwen3MoeForCausalLM):
    config_class = HeadwiseQwen3MoeConfig

    def __init__(self, config):
        super().__init__(config)
        use_headwise_blocks(self)


class HeadwiseQwen2MoeForCausalLM(Qwen2MoeForCausalLM):
    config_class = HeadwiseQwen2MoeConfig

    def __init__(self, config):
        super().__init__(config)
        use_headwise_blocks(self)


class HeadwiseDeepseekV3ForCausalLM(DeepseekV3ForCausalLM):
    config_class = HeadwiseDeepseekV3Config

    def __init__(self, config):
        super().__init__(config)
        use_headwise_blocks(self)
