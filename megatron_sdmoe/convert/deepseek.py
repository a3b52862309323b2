"""The DeepSeek family (model.preset: deepseek, multi-head latent attention) in Hugging Face
transformers' names and layouts (DeepseekV3ForCausalLM), for whole tensors, towards transformers.

Layouts agree beyond the names: megatron-core's MLA rotates the RoPE part of queries and keys
interleaved, as transformers' `rope_interleave` does (tested: reordering those rows breaks the
logits). Multi-token-prediction layers have no transformers counterpart and are left out.
"""
from __future__ import annotations

import torch

from megatron_sdmoe.config import Config, is_headwise
from megatron_sdmoe.convert.qwen import GLOBAL_NAMES, conversion_group, experts_to_hf, layer_index  # noqa: F401
from megatron_sdmoe.errors import UserError

ARCHITECTURES = {"deepseek": "DeepseekV3ForCausalLM"}
_RENAMED = {"input_layernorm.weight": "input_layernorm.weight",
            "pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
            "self_attention.linear_proj.weight": "self_attn.o_proj.weight",
            "self_attention.linear_q_down_proj.weight": "self_attn.q_a_proj.weight",
            "self_attention.q_layernorm.weight": "self_attn.q_a_layernorm.weight",
            "self_attention.linear_kv_up_proj.weight": "self_attn.kv_b_proj.weight",
            "self_attention.kv_layernorm.weight": "self_attn.kv_a_layernorm.weight",
            "mlp.router.weight": "mlp.gate.weight", "mlp.router.expert_bias": "mlp.gate.e_score_correction_bias",
            "mlp.linear_fc2.weight": "mlp.down_proj.weight",
            "mlp.shared_experts.linear_fc2.weight": "mlp.shared_experts.down_proj.weight"}
_RENAMED.update({"self_attention.linear_q_up_proj.weight": "self_attn.q_b_proj.weight",
                 "self_attention.linear_q_proj.weight": "self_attn.q_proj.weight",
                 "self_attention.linear_kv_down_proj.weight": "self_attn.kv_a_proj_with_mqa.weight"})
_GATE_UP = {"mlp.linear_fc1.weight": "mlp.", "mlp.shared_experts.linear_fc1.weight": "mlp.shared_experts."}


def hf_config(cfg: Config, vocab_size: int, dtype: torch.dtype):
    from transformers import DeepseekV3Config

    m, moe, mla = cfg.model, cfg.moe, cfg.model.mla
    if m.attention != "mla" or is_headwise(cfg):
        raise UserError("DeepseekV3ForCausalLM has multi-head latent attention and flat routing: export "
                        "model.attention=mla with moe.variant=topk or sdmoe")
    if moe.num_groups and moe.topk // moe.group_topk != 2:
        raise UserError(f"moe.topk / moe.group_topk = {moe.topk} / {moe.group_topk}: transformers' DeepSeek-V3 "
                        "scores a group by its top two experts; export a model that picks two per group")
    return DeepseekV3Config(
        vocab_size=vocab_size, hidden_size=m.hidden_size, num_hidden_layers=m.num_layers,
        num_attention_heads=m.num_attention_heads, num_key_value_heads=m.num_attention_heads,
        intermediate_size=m.dense_ffn_hidden_size or moe.ffn_hidden_size, moe_intermediate_size=moe.ffn_hidden_size,
        n_routed_experts=moe.num_experts, num_experts_per_tok=moe.topk,
        n_shared_experts=moe.shared_expert_ffn_hidden_size // moe.ffn_hidden_size,
        first_k_dense_replace=m.dense_layers, n_group=moe.num_groups or 1, topk_group=moe.group_topk or 1,
        routed_scaling_factor=moe.routed_scaling_factor, norm_topk_prob=moe.topk > 1,
        q_lora_rank=mla.q_lora_rank, kv_lora_rank=mla.kv_lora_rank, qk_rope_head_dim=mla.qk_rope_head_dim,
        qk_nope_head_dim=mla.qk_head_dim, v_head_dim=mla.v_head_dim, rope_interleave=True,
        max_position_embeddings=m.max_position_embeddings, rms_norm_eps=m.norm_epsilon,
        rope_parameters={"rope_type": "default", "rope_theta": float(m.rotary_base)}, tie_word_embeddings=False,
        architectures=[ARCHITECTURES["deepseek"]], dtype=str(dtype).removeprefix("torch."))


def to_hf(cfg: Config, name: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if name in GLOBAL_NAMES:
        return {GLOBAL_NAMES[name]: tensors[name]}
    if name.startswith("mtp."):
        return {}
    prefix, out = f"model.layers.{layer_index(name)}.", {}
    for key in tensors:
        if key in _RENAMED:
            out[prefix + _RENAMED[key]] = tensors[key]
        elif key in _GATE_UP:
            gate, up = tensors[key].chunk(2)
            out.update({f"{prefix}{_GATE_UP[key]}gate_proj.weight": gate, f"{prefix}{_GATE_UP[key]}up_proj.weight": up})
    out.update(experts_to_hf(prefix, tensors))
    return out
