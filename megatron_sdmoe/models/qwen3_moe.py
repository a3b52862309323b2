"""Qwen3-MoE-like family: RMSNorm, RoPE, GQA with QK-norm, SwiGLU experts, softmax top-k routing
with normalised top-k probabilities, load-balancing aux loss, no shared expert, untied embeddings."""
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
        qk_layernorm=True,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        moe_router_score_function="softmax",
        # Top-k on the logits, then softmax over the k chosen = softmax top-k renormalised (Qwen3's
        # norm_topk_prob=True).
        moe_router_pre_softmax=False,
    )


def layer_spec(cfg: Config) -> ModuleSpec:
    return with_expert_impl(get_gpt_layer_local_spec(num_experts=cfg.moe.num_experts, moe_grouped_gemm=False,
                                                     qk_layernorm=True, normalization="RMSNorm"), cfg)
