"""Qwen2-MoE-like family: RMSNorm, RoPE, GQA with QKV bias (no QK-norm), SwiGLU routed experts plus
one shared expert whose output is scaled by a sigmoid gate, softmax top-k without renormalising
the chosen probabilities, load-balancing aux loss, untied embeddings."""
from __future__ import annotations

from megatron_sdmoe.config import Config
from megatron_sdmoe.models.common import RMSNORM_SWIGLU

SCORE_FUNCTION = "softmax"  # the default of moe.score_function


def transformer_kwargs(cfg: Config) -> dict:
    return dict(
        **RMSNORM_SWIGLU,
        qk_layernorm=False,
        add_qkv_bias=True,
        moe_router_pre_softmax=True,  # softmax over all experts, then top-k: no renormalisation
        moe_shared_expert_gate=True,  # shared expert output * sigmoid(gate(x))
    )

