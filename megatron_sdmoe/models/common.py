"""TransformerConfig settings every family shares: parallel layout, precision, and the kernel
choices that run everywhere (megatron-core's local modules; no Transformer Engine or Apex needed)."""
from __future__ import annotations

import dataclasses
import functools

import torch
import torch.nn.functional as F
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.spec_utils import ModuleSpec

from megatron_sdmoe.config import Config
from megatron_sdmoe.moe.experts import GroupedExperts
from megatron_sdmoe.moe.sdmoe import SDMoEExperts


def shared_transformer_kwargs(cfg: Config, dtype: torch.dtype) -> dict:
    m, moe, par = cfg.model, cfg.moe, cfg.parallel
    return dict(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        num_attention_heads=m.num_attention_heads,
        num_query_groups=m.num_query_groups,
        kv_channels=m.kv_channels,
        layernorm_epsilon=m.norm_epsilon,
        init_method_std=m.init_method_std,
        ffn_hidden_size=moe.ffn_hidden_size,
        num_moe_experts=moe.num_experts,
        moe_router_topk=moe.topk,
        moe_ffn_hidden_size=moe.ffn_hidden_size,
        moe_shared_expert_intermediate_size=moe.shared_expert_ffn_hidden_size or None,
        moe_aux_loss_coeff=moe.aux_loss_coeff,
        moe_router_load_balancing_type="aux_loss" if moe.aux_loss_coeff > 0 else "none",
        moe_z_loss_coeff=moe.z_loss_coeff or None,
        moe_router_dtype=None if moe.router_dtype == "none" else moe.router_dtype,
        moe_token_dispatcher_type="alltoall",
        moe_grouped_gemm=False,
        moe_permute_fusion=False,
        tensor_model_parallel_size=par.tensor,
        expert_model_parallel_size=par.expert,
        expert_tensor_parallel_size=par.expert_tensor,
        sequence_parallel=par.tensor > 1,  # megatron-core requires it for MoE with TP
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        # Weights are drawn by models/init.py, layout-independently; megatron-core only allocates.
        perform_initialization=False,
        use_cpu_initialization=not torch.cuda.is_available(),
        hidden_dropout=0.0,
        attention_dropout=0.0,
        # Fused kernels need Transformer Engine / Apex / CUDA; the plain paths run everywhere.
        gradient_accumulation_fusion=False,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        apply_rope_fusion=False,
    )


def with_expert_impl(layer_spec: ModuleSpec, cfg: Config) -> ModuleSpec:
    """Swap the MoE layer's experts for the configured implementation: grouped-GEMM experts, or
    SD-MoE's decoupled ones (the spec's default, megatron-core's SequentialMLP, stays the reference)."""
    if cfg.moe.variant == "sdmoe":
        experts = functools.partial(SDMoEExperts, sdmoe=cfg.sdmoe, seed=cfg.train.seed)
    elif cfg.moe.expert_impl == "grouped":
        experts = GroupedExperts
    else:
        return layer_spec
    moe_layer = layer_spec.submodules.mlp  # functools.partial(MoELayer, submodules=MoESubmodules)
    submodules = dataclasses.replace(moe_layer.keywords["submodules"], experts=experts)
    layer_spec.submodules.mlp = functools.partial(moe_layer.func, *moe_layer.args,
                                                  **{**moe_layer.keywords, "submodules": submodules})
    return layer_spec


# What the Qwen and DeepSeek families share: RMSNorm, bias-free SwiGLU MLPs.
RMSNORM_SWIGLU = dict(normalization="RMSNorm", gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False)


def local_layer_spec(cfg: Config, qk_layernorm: bool) -> ModuleSpec:
    """megatron-core's local (Transformer-Engine-free) MoE transformer layer with RMSNorm."""
    return with_expert_impl(get_gpt_layer_local_spec(num_experts=cfg.moe.num_experts, moe_grouped_gemm=False,
                                                     qk_layernorm=qk_layernorm, normalization="RMSNorm"), cfg)
