"""Qwen2-MoE-like family: RMSNorm, RoPE, GQA with QKV bias (no QK-norm), SwiGLU routed experts plus
one shared expert whose output is scaled by a sigmoid gate, softmax top-k without renormalising
the chosen probabilities, load-balancing aux loss, untied embeddings."""
from __future__ import annotations

import torch.nn.functional as F
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.spec_utils import ModuleSpec

from megatron_sdmoe.config import Config
from megatron_sdmoe.models.common import with_expert_impl

TIE_EMBEDDINGS = False


def transformer_kwargs(cfg: Config) -> dict:
    return dict(
        normalization="RMSNorm",
        qk_layernorm=False,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=True,
        moe_router_score_function="softmax",
        moe_router_pre_softmax=True,  # softmax over all experts, then top-k: no renormalisation
        moe_shared_expert_gate=True,  # shared expert output * sigmoid(gate(x))
    )


def layer_spec(cfg: Config) -> ModuleSpec:
    return with_expert_impl(get_gpt_layer_local_spec(num_experts=cfg.moe.num_experts, moe_grouped_gemm=False,
                                                     qk_layernorm=False, normalization="RMSNorm"), cfg)
