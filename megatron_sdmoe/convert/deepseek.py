"""The DeepSeek family (model.preset: deepseek, multi-head latent attention) in Hugging Face
transformers' names and layouts (DeepseekV3ForCausalLM), both directions (shared pieces: mapping.py).

Layouts agree beyond the names: megatron-core's MLA rotates the RoPE part of queries and keys
interleaved, as transformers' `rope_interleave` does (tested: reordering those rows breaks the
logits). The routing bias of auxiliary-loss-free balancing is transformers' `e_score_correction_bias`.
"""
from __future__ import annotations

import torch

from megatron_sdmoe.config import Config, expert_ffn_hidden_size, routed_experts, routed_topk
from megatron_sdmoe.convert import mapping
from megatron_sdmoe.errors import UserError

ARCHITECTURES = {"deepseek": "DeepseekV3ForCausalLM"}
RENAMED = {"input_layernorm.weight": "input_layernorm.weight",
           "pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
           "self_attention.linear_proj.weight": "self_attn.o_proj.weight",
           "self_attention.linear_q_proj.weight": "self_attn.q_proj.weight",  # without a query latent (V2-Lite)
           "self_attention.linear_q_down_proj.weight": "self_attn.q_a_proj.weight",
           "self_attention.q_layernorm.weight": "self_attn.q_a_layernorm.weight",
           "self_attention.linear_q_up_proj.weight": "self_attn.q_b_proj.weight",
           "self_attention.linear_kv_down_proj.weight": "self_attn.kv_a_proj_with_mqa.weight",
           "self_attention.kv_layernorm.weight": "self_attn.kv_a_layernorm.weight",
           "self_attention.linear_kv_up_proj.weight": "self_attn.kv_b_proj.weight",
           "mlp.linear_fc2.weight": "mlp.down_proj.weight",
           "mlp.shared_experts.linear_fc2.weight": "mlp.shared_experts.down_proj.weight"}
GATE_UP = {"mlp.linear_fc1.weight": "mlp.", "mlp.shared_experts.linear_fc1.weight": "mlp.shared_experts."}
# transformers' DeepSeek-V3 scores a routing group by the sum of its top two experts' scores;
# megatron-core by its top (top-k / groups picked), so the two agree when that is two
EXPERTS_PER_GROUP = 2


def check_routing(cfg: Config) -> None:
    """Refuse flat routing transformers' DeepSeek-V3 does not compute."""
    from megatron_sdmoe.models.common import score_function

    moe = cfg.moe
    if score_function(cfg) != "sigmoid":
        raise UserError("transformers' DeepSeek-V3 routes by sigmoid scores: export moe.score_function=sigmoid")
    if moe.num_groups and moe.topk // moe.group_topk != EXPERTS_PER_GROUP:
        raise UserError(f"moe.topk / moe.group_topk = {moe.topk} / {moe.group_topk}: transformers' DeepSeek-V3 "
                        f"scores a group by its top {EXPERTS_PER_GROUP} experts; export a model that picks "
                        f"{EXPERTS_PER_GROUP} per group")


def hf_config(cfg: Config, vocab_size: int, dtype: torch.dtype):
    """As qwen.hf_config, for DeepseekV3ForCausalLM."""
    from transformers import DeepseekV3Config

    m, moe, mla, ffn = cfg.model, cfg.moe, cfg.model.mla, expert_ffn_hidden_size(cfg)
    if m.attention != "mla":
        raise UserError("DeepseekV3ForCausalLM has multi-head latent attention: export model.attention=mla")
    if moe.shared_expert_ffn_hidden_size % ffn:
        raise UserError(f"moe.shared_expert_ffn_hidden_size={moe.shared_expert_ffn_hidden_size}: transformers' "
                        "DeepSeek-V3 has n_shared_experts of the routed experts' width; export a multiple of "
                        f"that width ({ffn})")
    return DeepseekV3Config(
        vocab_size=vocab_size, hidden_size=m.hidden_size, num_hidden_layers=m.num_layers,
        num_attention_heads=m.num_attention_heads, num_key_value_heads=m.num_attention_heads,
        intermediate_size=m.dense_ffn_hidden_size or moe.ffn_hidden_size, moe_intermediate_size=ffn,
        n_routed_experts=routed_experts(cfg), num_experts_per_tok=routed_topk(cfg),
        n_shared_experts=moe.shared_expert_ffn_hidden_size // ffn,
        first_k_dense_replace=m.dense_layers, n_group=moe.num_groups or 1, topk_group=moe.group_topk or 1,
        routed_scaling_factor=moe.routed_scaling_factor, norm_topk_prob=routed_topk(cfg) > 1,
        q_lora_rank=mla.q_lora_rank, kv_lora_rank=mla.kv_lora_rank, qk_rope_head_dim=mla.qk_rope_head_dim,
        qk_nope_head_dim=mla.qk_head_dim, v_head_dim=mla.v_head_dim, rope_interleave=True,
        max_position_embeddings=m.max_position_embeddings, rms_norm_eps=m.norm_epsilon,
        rope_parameters=mapping.rope_parameters(m.rotary_base), tie_word_embeddings=False,
        architectures=[ARCHITECTURES["deepseek"]], dtype=str(dtype).removeprefix("torch."))


def config_overrides(hf) -> list[str]:
    """The inverse of `hf_config`; a field this adapter cannot represent is refused by name."""
    grouped = (hf.n_group or 1) > 1
    flat = getattr(hf, "headwise", None) is None  # head-wise exports route as megatron-core does (headwise_modeling.py)
    mapping.refuse_unsupported("deepseek", {
        **mapping.shared_unsupported(hf), "rope_interleave=false": not hf.rope_interleave,
        "attention_bias": hf.attention_bias,
        "num_key_value_heads != num_attention_heads": hf.num_key_value_heads != hf.num_attention_heads,
        "norm_topk_prob": hf.norm_topk_prob != (hf.num_experts_per_tok > 1),  # sigmoid scores renormalise (k > 1)
        "n_group with num_experts_per_tok / topk_group != 2":
            flat and grouped and hf.num_experts_per_tok != EXPERTS_PER_GROUP * hf.topk_group})
    overrides = {**mapping.shared_overrides(hf), "model.preset": "deepseek", "model.attention": "mla",
                 "model.num_query_groups": hf.num_attention_heads,  # unused by MLA
                 "model.mla.q_lora_rank": hf.q_lora_rank or "null", "model.mla.kv_lora_rank": hf.kv_lora_rank,
                 "model.mla.qk_head_dim": hf.qk_nope_head_dim, "model.mla.qk_rope_head_dim": hf.qk_rope_head_dim,
                 "model.mla.v_head_dim": hf.v_head_dim, "model.dense_layers": hf.first_k_dense_replace,
                 "model.dense_ffn_hidden_size": hf.intermediate_size, "model.mtp_layers": 0,
                 "moe.num_experts": hf.n_routed_experts, "moe.ffn_hidden_size": hf.moe_intermediate_size,
                 "moe.shared_expert_ffn_hidden_size": hf.n_shared_experts * hf.moe_intermediate_size,
                 "moe.score_function": "sigmoid", "moe.routed_scaling_factor": hf.routed_scaling_factor,
                 "moe.num_groups": hf.n_group if grouped else 0, "moe.group_topk": hf.topk_group if grouped else 0,
                 "moe.expert_bias_update_rate": mapping.BIAS_UPDATE_RATE}
    return [f"{key}={value}" for key, value in overrides.items()]


def to_hf(cfg: Config, name: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return mapping.to_hf(name, tensors, RENAMED, GATE_UP)


def from_hf(cfg: Config, name: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return mapping.from_hf(name, tensors, RENAMED, GATE_UP, routed_experts(cfg))
