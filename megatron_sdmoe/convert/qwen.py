"""The Qwen families (qwen3_moe, qwen2_moe) in Hugging Face transformers' names and layouts
(Qwen3MoeForCausalLM, Qwen2MoeForCausalLM), both directions (shared pieces: mapping.py).

Besides the SwiGLU stacks and stacked experts, megatron-core fuses the attention's Q, K and V
(one weight, laid out per query group: the group's query heads, then its key head, then its value
head).
"""
from __future__ import annotations

import torch

from megatron_sdmoe.config import Config, expert_ffn_hidden_size, routed_experts, routed_topk
from megatron_sdmoe.convert import mapping
from megatron_sdmoe.convert.mapping import layer_index
from megatron_sdmoe.errors import UserError

RENAMED = {"input_layernorm.weight": "input_layernorm.weight",
           "pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
           "self_attention.linear_proj.weight": "self_attn.o_proj.weight",
           "self_attention.q_layernorm.weight": "self_attn.q_norm.weight",
           "self_attention.k_layernorm.weight": "self_attn.k_norm.weight",
           "mlp.shared_experts.gate_weight": "mlp.shared_expert_gate.weight",
           "mlp.shared_experts.linear_fc2.weight": "mlp.shared_expert.down_proj.weight",
           "mlp.linear_fc2.weight": "mlp.down_proj.weight"}  # dense layers (transformers' mlp_only_layers)
GATE_UP = {"mlp.shared_experts.linear_fc1.weight": "mlp.shared_expert.", "mlp.linear_fc1.weight": "mlp."}
ARCHITECTURES = {"qwen3_moe": "Qwen3MoeForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM"}
# transformers' Qwen MoE classes have no multi-token prediction: an MTP layer's tensors are not exported
EXPORTS_MTP = False


def check_routing(cfg: Config) -> None:
    """Refuse flat routing transformers' Qwen MoE classes do not compute."""
    from megatron_sdmoe.models.common import score_function

    moe = cfg.moe
    flat_softmax = score_function(cfg) == "softmax" and not moe.num_groups and not moe.expert_bias_update_rate
    if not flat_softmax or moe.routed_scaling_factor != 1:
        raise UserError("transformers' Qwen MoE models route by a softmax over the layer's experts, without groups, "
                        "a routing bias or scaling: export moe.score_function=softmax, moe.num_groups=0, "
                        "moe.expert_bias_update_rate=0, moe.routed_scaling_factor=1")


def hf_config(cfg: Config, vocab_size: int, dtype: torch.dtype):
    """The transformers config of this config's model (`vocab_size`: the padded embedding rows;
    `dtype`: the exported tensors'); routing as `check_routing` allows, or head-wise (whose
    config headwise_export.py completes)."""
    from transformers import Qwen2MoeConfig, Qwen3MoeConfig

    from megatron_sdmoe.models import PRESETS

    m, moe = cfg.model, cfg.moe
    if m.preset == "qwen3_moe" and moe.shared_expert_ffn_hidden_size:
        raise UserError("Qwen3MoeForCausalLM has no shared expert: export moe.shared_expert_ffn_hidden_size=0, "
                        "or model.preset=qwen2_moe")
    family = PRESETS[m.preset].transformer_kwargs(cfg)
    common = dict(vocab_size=vocab_size, hidden_size=m.hidden_size, num_hidden_layers=m.num_layers,
                  num_attention_heads=m.num_attention_heads, num_key_value_heads=m.num_query_groups,
                  head_dim=m.kv_channels or m.hidden_size // m.num_attention_heads,
                  max_position_embeddings=m.max_position_embeddings, rms_norm_eps=m.norm_epsilon,
                  rope_parameters=mapping.rope_parameters(m),
                  tie_word_embeddings=False, num_experts=routed_experts(cfg),
                  num_experts_per_tok=routed_topk(cfg), moe_intermediate_size=expert_ffn_hidden_size(cfg),
                  intermediate_size=m.dense_ffn_hidden_size or moe.ffn_hidden_size,
                  router_aux_loss_coef=moe.aux_loss_coeff,
                  # top-k then softmax over the chosen = renormalised; softmax over all first = not
                  norm_topk_prob=not family["moe_router_pre_softmax"], decoder_sparse_step=1,
                  mlp_only_layers=list(range(m.dense_layers)),
                  architectures=[ARCHITECTURES[m.preset]], dtype=str(dtype).removeprefix("torch."))
    if m.preset == "qwen2_moe":
        return Qwen2MoeConfig(**common, shared_expert_intermediate_size=moe.shared_expert_ffn_hidden_size,
                              qkv_bias=True)
    return Qwen3MoeConfig(**common, attention_bias=False)


def config_overrides(hf, names: list[str]) -> list[str]:
    """The model-defining settings of a transformers config (and the names of its weights), as
    this system's overrides (the inverse of `hf_config`); a field this adapter cannot represent is
    refused by name."""
    from transformers import Qwen2MoeConfig

    preset = "qwen2_moe" if isinstance(hf, Qwen2MoeConfig) else "qwen3_moe"  # head-wise exports subclass them
    dense = len(hf.mlp_only_layers)
    mapping.refuse_unsupported(preset, {
        **mapping.shared_unsupported(hf),
        "mlp_only_layers other than the first layers": list(hf.mlp_only_layers) != list(range(dense)),
        "decoder_sparse_step": hf.decoder_sparse_step != 1, "use_sliding_window": hf.use_sliding_window,
        # the family fixes these: Qwen3 renormalises the top-k (k > 1), Qwen2 does not
        "norm_topk_prob": hf.norm_topk_prob != (preset == "qwen3_moe" and hf.num_experts_per_tok > 1),
        "attention_bias": getattr(hf, "qkv_bias", getattr(hf, "attention_bias", False)) != (preset == "qwen2_moe")})
    overrides = {**mapping.shared_overrides(hf), "model.preset": preset,
                 "model.num_query_groups": hf.num_key_value_heads,
                 "model.kv_channels": getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads,
                 "model.dense_layers": dense, "model.dense_ffn_hidden_size": hf.intermediate_size,
                 "moe.num_experts": hf.num_experts, "moe.ffn_hidden_size": hf.moe_intermediate_size,
                 "moe.aux_loss_coeff": hf.router_aux_loss_coef}
    if preset == "qwen2_moe":
        overrides["moe.shared_expert_ffn_hidden_size"] = hf.shared_expert_intermediate_size
    return [f"{key}={value}" for key, value in overrides.items()]


def to_hf(cfg: Config, name: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A conversion group (mapping.to_hf) -> transformers tensors."""
    out = mapping.to_hf(name, tensors, RENAMED, GATE_UP, cfg.model.num_layers)
    for key in tensors:
        if key.startswith("self_attention.linear_qkv."):
            out.update({f"model.layers.{layer_index(name)}.self_attn.{p}_proj.{key.rsplit('.', 1)[1]}": t
                        for p, t in zip("qkv", _split_qkv(cfg, tensors[key]))})
    return out


def from_hf(cfg: Config, name: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of `to_hf`."""
    out = mapping.from_hf(name, tensors, RENAMED, GATE_UP, routed_experts(cfg), cfg.model.num_layers)
    for part in ("weight", "bias"):
        if f"self_attn.q_proj.{part}" in tensors:
            out[f"decoder.layers.{layer_index(name)}.self_attention.linear_qkv.{part}"] = _merge_qkv(
                cfg, *(tensors[f"self_attn.{p}_proj.{part}"] for p in "qkv"))
    return out


def _qkv_layout(cfg: Config) -> tuple[int, int, int]:
    m = cfg.model
    return m.num_query_groups, m.num_attention_heads // m.num_query_groups, \
        m.kv_channels or m.hidden_size // m.num_attention_heads


def _split_qkv(cfg: Config, fused: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """megatron-core's [groups x (queries per group + 2) x head dim, ...] -> Q, K, V."""
    groups, per_group, head_dim = _qkv_layout(cfg)
    grouped = fused.view(groups, per_group + 2, head_dim, *fused.shape[1:])
    q, k, v = grouped.split([per_group, 1, 1], dim=1)
    return tuple(t.reshape(-1, *fused.shape[1:]) for t in (q, k, v))


def _merge_qkv(cfg: Config, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    groups, per_group, head_dim = _qkv_layout(cfg)
    parts = [t.reshape(groups, n, head_dim, *t.shape[1:]) for t, n in ((q, per_group), (k, 1), (v, 1))]
    return torch.cat(parts, dim=1).reshape(-1, *q.shape[1:])
