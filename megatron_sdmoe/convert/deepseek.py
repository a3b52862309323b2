"""The DeepSeek family (model.preset: deepseek, multi-head latent attention) in Hugging Face
transformers' names and layouts, both directions (shared pieces: mapping.py): sigmoid routing as
DeepseekV3ForCausalLM, softmax routing as DeepseekV2ForCausalLM (its tensors are named as V3's,
less the routing bias).

Layouts agree beyond the names: megatron-core's MLA rotates the RoPE part of queries and keys
interleaved, as transformers' `rope_interleave` does (tested: reordering those rows breaks the
logits; DeepSeek-V2 rotates the same pairs as complex numbers). The routing bias of
auxiliary-loss-free balancing is transformers' `e_score_correction_bias`.
"""
from __future__ import annotations

import torch

from megatron_sdmoe.config import Config, expert_ffn_hidden_size, is_headwise, routed_experts, routed_topk
from megatron_sdmoe.convert import mapping
from megatron_sdmoe.errors import UserError

# the exported class by routing score (head-wise exports build on V3: their routing is their own)
ARCHITECTURES = {"sigmoid": "DeepseekV3ForCausalLM", "softmax": "DeepseekV2ForCausalLM"}
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
           "mlp.shared_experts.linear_fc2.weight": "mlp.shared_experts.down_proj.weight",
           # a multi-token-prediction layer's own (mapping.MTP_OWN)
           "enorm.weight": "enorm.weight", "hnorm.weight": "hnorm.weight", "eh_proj.weight": "eh_proj.weight",
           "final_layernorm.weight": "shared_head.norm.weight"}
# MTP layers are exported as DeepSeek-V3 lays them out (transformers reads the count, not the layers)
EXPORTS_MTP = True
GATE_UP = {"mlp.linear_fc1.weight": "mlp.", "mlp.shared_experts.linear_fc1.weight": "mlp.shared_experts."}
# transformers' DeepSeek-V3 scores a routing group by the sum of its top two experts' scores,
# DeepSeek-V2 by its best one; megatron-core by its top (top-k / groups picked), so they agree
# when that is two (V3) or one (V2: the groups then never exclude one of the overall top k)
EXPERTS_PER_GROUP = {"sigmoid": 2, "softmax": 1}


def _scores(cfg: Config) -> str:
    from megatron_sdmoe.models.common import score_function

    return "sigmoid" if is_headwise(cfg) else score_function(cfg)


def check_routing(cfg: Config) -> None:
    """Refuse flat routing transformers' DeepSeek-V3 (sigmoid) or -V2 (softmax) does not compute."""
    moe, scores = cfg.moe, _scores(cfg)
    per_group, version = EXPERTS_PER_GROUP[scores], ARCHITECTURES[scores].removesuffix("ForCausalLM")
    if moe.num_groups and moe.topk // moe.group_topk != per_group:
        raise UserError(f"moe.topk / moe.group_topk = {moe.topk} / {moe.group_topk}: transformers' {version} "
                        f"scores a group by its top {per_group} expert{'s' * (per_group > 1)}; export a model that "
                        f"picks {per_group} per group")


def hf_config(cfg: Config, vocab_size: int, dtype: torch.dtype):
    """As qwen.hf_config, for DeepseekV3ForCausalLM or DeepseekV2ForCausalLM."""
    from transformers import DeepseekV2Config, DeepseekV3Config

    m, moe, mla, ffn, scores = cfg.model, cfg.moe, cfg.model.mla, expert_ffn_hidden_size(cfg), _scores(cfg)
    if m.attention != "mla":
        raise UserError(f"{ARCHITECTURES[scores]} has multi-head latent attention: export model.attention=mla")
    if moe.shared_expert_ffn_hidden_size % ffn:
        raise UserError(f"moe.shared_expert_ffn_hidden_size={moe.shared_expert_ffn_hidden_size}: transformers' "
                        "DeepSeek has n_shared_experts of the routed experts' width; export a multiple of "
                        f"that width ({ffn})")
    common = dict(
        vocab_size=vocab_size, hidden_size=m.hidden_size, num_hidden_layers=m.num_layers,
        num_attention_heads=m.num_attention_heads, num_key_value_heads=m.num_attention_heads,
        intermediate_size=m.dense_ffn_hidden_size or moe.ffn_hidden_size, moe_intermediate_size=ffn,
        n_routed_experts=routed_experts(cfg), num_experts_per_tok=routed_topk(cfg),
        n_shared_experts=moe.shared_expert_ffn_hidden_size // ffn,
        first_k_dense_replace=m.dense_layers, routed_scaling_factor=moe.routed_scaling_factor,
        q_lora_rank=mla.q_lora_rank, kv_lora_rank=mla.kv_lora_rank, qk_rope_head_dim=mla.qk_rope_head_dim,
        qk_nope_head_dim=mla.qk_head_dim, v_head_dim=mla.v_head_dim,
        max_position_embeddings=m.max_position_embeddings, rms_norm_eps=m.norm_epsilon,
        rope_parameters=mapping.rope_parameters(m), tie_word_embeddings=False,
        architectures=[ARCHITECTURES[scores]], dtype=str(dtype).removeprefix("torch."),
        # how it was trained, as DeepSeek's released configs state it (transformers keeps, not reads, them)
        aux_loss_alpha=moe.aux_loss_coeff, seq_aux=moe.aux_loss_type == "sequence")
    if scores == "softmax":  # softmax over all experts, the top-k as they are
        if m.mtp_layers:
            raise UserError("transformers' DeepSeek-V2 has no multi-token prediction: export model.mtp_layers=0, "
                            "or sigmoid routing (DeepSeek-V3)")
        return DeepseekV2Config(**common, topk_method="group_limited_greedy" if moe.num_groups else "greedy",
                                n_group=moe.num_groups or None, topk_group=moe.group_topk or None,
                                norm_topk_prob=False)
    return DeepseekV3Config(**common, n_group=moe.num_groups or 1, topk_group=moe.group_topk or 1,
                            norm_topk_prob=routed_topk(cfg) > 1, rope_interleave=True, num_mtp_layers=m.mtp_layers)


def config_overrides(hf, names: list[str]) -> list[str]:
    """The inverse of `hf_config`; a field this adapter cannot represent is refused by name. The
    MTP layers are those the weights (`names`) hold, each with its `eh_proj`: transformers saves
    none, whatever its config's `num_nextn_predict_layers` says."""
    from transformers import DeepseekV2Config

    v2 = isinstance(hf, DeepseekV2Config)
    mtp = 0 if v2 else len({mapping.layer_index(name) for name in names
                            if name.startswith("model.layers.") and ".eh_proj." in name})
    grouped = (hf.n_group or 1) > 1 and not (v2 and hf.topk_method == "greedy")  # V2's greedy ignores groups
    flat = getattr(hf, "headwise", None) is None  # head-wise exports route as megatron-core does (headwise_modeling.py)
    per_group = EXPERTS_PER_GROUP["softmax" if v2 else "sigmoid"]
    mapping.refuse_unsupported("deepseek", {
        **mapping.shared_unsupported(hf), "rope_interleave=false": not getattr(hf, "rope_interleave", True),
        "attention_bias": hf.attention_bias, "mlp_bias": getattr(hf, "mlp_bias", False),
        "num_key_value_heads != num_attention_heads": hf.num_key_value_heads != hf.num_attention_heads,
        # sigmoid scores renormalise (k > 1); transformers' DeepSeek-V2 never does, whatever it says
        "norm_topk_prob": not v2 and hf.norm_topk_prob != (hf.num_experts_per_tok > 1),
        "topk_method other than greedy or group_limited_greedy": v2 and hf.topk_method not in
        ("greedy", "group_limited_greedy"),
        # megatron-core scores a group by its top topk // group_topk experts (as export checks)
        f"n_group with num_experts_per_tok // topk_group != {per_group}":
            flat and grouped and hf.num_experts_per_tok // hf.topk_group != per_group})
    overrides = {**mapping.shared_overrides(hf), "model.preset": "deepseek", "model.attention": "mla",
                 "model.num_query_groups": hf.num_attention_heads,  # unused by MLA
                 "model.mla.q_lora_rank": hf.q_lora_rank or "null", "model.mla.kv_lora_rank": hf.kv_lora_rank,
                 "model.mla.qk_head_dim": hf.qk_nope_head_dim, "model.mla.qk_rope_head_dim": hf.qk_rope_head_dim,
                 "model.mla.v_head_dim": hf.v_head_dim, "model.dense_layers": hf.first_k_dense_replace,
                 "model.dense_ffn_hidden_size": hf.intermediate_size, "model.mtp_layers": mtp,
                 "moe.num_experts": hf.n_routed_experts, "moe.ffn_hidden_size": hf.moe_intermediate_size,
                 "moe.shared_expert_ffn_hidden_size": hf.n_shared_experts * hf.moe_intermediate_size,
                 "moe.score_function": "softmax" if v2 else "sigmoid",
                 "moe.routed_scaling_factor": hf.routed_scaling_factor,
                 "moe.num_groups": hf.n_group if grouped else 0, "moe.group_topk": hf.topk_group if grouped else 0,
                 "moe.expert_bias_update_rate": 0 if v2 else mapping.BIAS_UPDATE_RATE,
                 # DeepSeek's released configs say how they were trained (transformers does not read it)
                 **({"moe.aux_loss_coeff": hf.aux_loss_alpha} if hasattr(hf, "aux_loss_alpha") else {}),
                 **({"moe.aux_loss_type": "sequence" if hf.seq_aux else "batch"} if hasattr(hf, "seq_aux") else {})}
    return [f"{key}={value}" for key, value in overrides.items()]


def to_hf(cfg: Config, name: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return mapping.to_hf(name, tensors, RENAMED, GATE_UP, cfg.model.num_layers)


def from_hf(cfg: Config, name: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return mapping.from_hf(name, tensors, RENAMED, GATE_UP, routed_experts(cfg), cfg.model.num_layers)
