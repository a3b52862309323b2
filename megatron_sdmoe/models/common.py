"""TransformerConfig settings every family shares: parallel layout, precision, and the kernel
choices that run everywhere (megatron-core's local modules; no Transformer Engine or Apex needed)."""
from __future__ import annotations

import dataclasses
import functools

import torch
import torch.nn.functional as F
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec, get_gpt_mtp_block_spec
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_sdmoe.config import (Config, expert_ffn_hidden_size, is_headwise, is_sdmoe, routed_experts,
                                   routed_topk, sdmoe_group_size)
from megatron_sdmoe.models.attention import SDPAttention
from megatron_sdmoe.models.mla import TensorParallelMLASelfAttention
from megatron_sdmoe.moe.experts import GroupedExperts
from megatron_sdmoe.moe.headwise import HeadwiseMoELayer
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
        ffn_hidden_size=m.dense_ffn_hidden_size or moe.ffn_hidden_size,  # the dense layers' MLP
        moe_layer_freq=[0] * m.dense_layers + [1] * (m.num_layers - m.dense_layers),
        mtp_num_layers=m.mtp_layers or None,
        mtp_loss_scaling_factor=m.mtp_loss_coeff,
        num_moe_experts=routed_experts(cfg),
        moe_router_topk=routed_topk(cfg),
        moe_ffn_hidden_size=expert_ffn_hidden_size(cfg),
        moe_shared_expert_intermediate_size=moe.shared_expert_ffn_hidden_size or None,
        moe_router_score_function=score_function(cfg),
        moe_aux_loss_coeff=moe.aux_loss_coeff,
        moe_router_load_balancing_type=(AUX_LOSS_TYPES[moe.aux_loss_type] if moe.aux_loss_coeff > 0 else "none"),
        moe_z_loss_coeff=moe.z_loss_coeff or None,
        moe_router_enable_expert_bias=moe.expert_bias_update_rate > 0,
        moe_router_bias_update_rate=moe.expert_bias_update_rate,
        moe_router_num_groups=moe.num_groups or None,
        moe_router_group_topk=moe.group_topk or None,
        moe_router_topk_scaling_factor=moe.routed_scaling_factor,
        moe_expert_capacity_factor=moe.capacity_factor,
        moe_token_drop_policy=moe.token_drop_policy,
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
        **recompute_settings(cfg),
    )


def recompute_settings(cfg: Config) -> dict:
    """megatron-core's activation recomputation for train.recompute: full recomputes each layer
    as its own unit (the "uniform" method, one layer per unit, the one that covers MTP layers too),
    or only the first train.recompute_layers ("block")."""
    tr = cfg.train
    if tr.recompute == "selective":
        return dict(recompute_granularity="selective", recompute_modules=list(tr.recompute_modules))
    if tr.recompute == "full":
        return dict(recompute_granularity="full", recompute_method="block" if tr.recompute_layers else "uniform",
                    recompute_num_layers=tr.recompute_layers or 1)
    return {}


def with_moe_variant(layer_spec: ModuleSpec, cfg: Config) -> ModuleSpec:
    """A copy of an MoE layer spec with the configured variant: grouped-GEMM experts or SD-MoE's
    decoupled ones (the spec's default, megatron-core's SequentialMLP, stays the reference), in
    megatron-core's MoE layer or the head-wise one. Dense layer specs come back unchanged."""
    moe_layer = layer_spec.submodules.mlp  # functools.partial(MoELayer or MLP, submodules=...)
    if moe_layer.func is not MoELayer or cfg.moe.expert_impl == "sequential":
        return layer_spec
    experts = (functools.partial(SDMoEExperts, sdmoe=cfg.sdmoe, seed=cfg.train.seed, group_size=sdmoe_group_size(cfg))
               if is_sdmoe(cfg) else GroupedExperts)
    layer = functools.partial(HeadwiseMoELayer, headwise=cfg.headwise) if is_headwise(cfg) else MoELayer
    submodules = dataclasses.replace(moe_layer.keywords["submodules"], experts=experts)
    mlp = functools.partial(layer, *moe_layer.args, **{**moe_layer.keywords, "submodules": submodules})
    return dataclasses.replace(layer_spec, submodules=dataclasses.replace(layer_spec.submodules, mlp=mlp))


def with_sdpa_attention(layer_spec: ModuleSpec, config: TransformerConfig) -> ModuleSpec:
    """A copy of a layer spec whose core attention is torch's fused kernel (models/attention.py).
    MLA is the tensor-parallel-exact one (models/mla.py); without a query latent it has no query
    norm (megatron-core refuses one there)."""
    attention = layer_spec.submodules.self_attention
    changes = {"core_attention": SDPAttention}
    if config.multi_latent_attention and config.q_lora_rank is None:
        changes["q_layernorm"] = IdentityOp
    attention = dataclasses.replace(attention, submodules=dataclasses.replace(attention.submodules, **changes))
    if config.multi_latent_attention:
        attention = dataclasses.replace(attention, module=TensorParallelMLASelfAttention)
    return dataclasses.replace(layer_spec, submodules=dataclasses.replace(layer_spec.submodules,
                                                                          self_attention=attention))


def decoder_specs(config: TransformerConfig, cfg: Config) -> tuple[TransformerBlockSubmodules, ModuleSpec | None]:
    """The decoder block (dense first layers, then MoE layers, per config.moe_layer_freq) and the
    multi-token-prediction block, from megatron-core's local (Transformer-Engine-free) layer specs
    with this project's experts and core attention."""
    block = get_gpt_decoder_block_spec(config, use_transformer_engine=False, normalization="RMSNorm")
    block = dataclasses.replace(block, layer_specs=[with_sdpa_attention(with_moe_variant(spec, cfg), config)
                                                    for spec in block.layer_specs])
    mtp = (get_gpt_mtp_block_spec(config, block.layer_specs[-1], use_transformer_engine=False)
           if config.mtp_num_layers else None)
    return block, mtp


def score_function(cfg: Config) -> str:
    from megatron_sdmoe.models import PRESETS

    return cfg.moe.score_function or PRESETS[cfg.model.preset].SCORE_FUNCTION


AUX_LOSS_TYPES = {"batch": "aux_loss", "sequence": "seq_aux_loss"}  # config name -> megatron-core's

# What the Qwen and DeepSeek families share: RMSNorm, bias-free SwiGLU MLPs.
RMSNORM_SWIGLU = dict(normalization="RMSNorm", gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False)
