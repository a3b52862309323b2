"""Qwen3-MoE-like family: RMSNorm, RoPE, GQA with QK-norm, SwiGLU experts, softmax top-k routing
with normalised top-k probabilities, load-balancing aux loss, no shared expert, untied embeddings."""
from __future__ import annotations

from megatron_sdmoe.config import Config, routed_topk
from megatron_sdmoe.models.common import RMSNORM_SWIGLU

SCORE_FUNCTION = "softmax"  # the default of moe.score_function


def transformer_kwargs(cfg: Config) -> dict:
    return dict(
        **RMSNORM_SWIGLU,
        qk_layernorm=True,
        add_qkv_bias=False,
        # Top-k on the logits, then softmax over the k chosen = softmax top-k renormalised (Qwen3's
        # norm_topk_prob=True). Over one chosen expert that is a constant 1 and the router would learn
        # nothing from the LM loss, so top-1 routing (head-wise routing's usual) keeps the softmax
        # over all experts.
        moe_router_pre_softmax=routed_topk(cfg) == 1,
    )

