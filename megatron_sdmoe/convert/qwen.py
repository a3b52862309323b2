"""The Qwen families (qwen3_moe, qwen2_moe) in Hugging Face transformers' names and layouts
(Qwen3MoeForCausalLM, Qwen2MoeForCausalLM), for whole (unsharded) tensors, one layer at a time.

megatron-core fuses what transformers keeps apart: the attention's Q, K and V (one weight, laid
out per query group: the group's query heads, then its key head, then its value head), each
SwiGLU's gate and up projections (stacked, gate first), and all routed experts of a layer (one
[experts, ...] tensor here). SD-MoE experts are exported as plain experts: effective weight =
common + unique. Head-wise routing has no transformers class and is refused.
"""
from __future__ import annotations

import math
import re

import torch

from megatron_sdmoe.config import Config, is_headwise
from megatron_sdmoe.errors import UserError

# names outside the decoder layers, and inside a layer those that only change their prefix
GLOBAL_NAMES = {"embedding.word_embeddings.weight": "model.embed_tokens.weight",
           "decoder.final_layernorm.weight": "model.norm.weight", "output_layer.weight": "lm_head.weight"}
_RENAMED = {"input_layernorm.weight": "input_layernorm.weight",
            "pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
            "self_attention.linear_proj.weight": "self_attn.o_proj.weight",
            "self_attention.q_layernorm.weight": "self_attn.q_norm.weight",
            "self_attention.k_layernorm.weight": "self_attn.k_norm.weight",
            "mlp.router.weight": "mlp.gate.weight",
            "mlp.shared_experts.gate_weight": "mlp.shared_expert_gate.weight",
            "mlp.shared_experts.linear_fc2.weight": "mlp.shared_expert.down_proj.weight"}
ARCHITECTURES = {"qwen3_moe": "Qwen3MoeForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM"}


def hf_config(cfg: Config, vocab_size: int, dtype: torch.dtype):
    """The transformers config of this config's model (`vocab_size`: the padded embedding rows;
    `dtype`: the exported tensors')."""
    from transformers import Qwen2MoeConfig, Qwen3MoeConfig

    m, moe = cfg.model, cfg.moe
    if m.preset not in ARCHITECTURES:
        raise UserError(f"model.preset={m.preset} has no Qwen export: use the {m.preset} adapter")
    if is_headwise(cfg):
        raise UserError(f"moe.variant={moe.variant}: head-wise routing has no Hugging Face transformers class, "
                        "so it cannot be exported (yet)")
    from megatron_sdmoe.models import PRESETS

    family = PRESETS[m.preset].transformer_kwargs(cfg)
    common = dict(vocab_size=vocab_size, hidden_size=m.hidden_size, num_hidden_layers=m.num_layers,
                  num_attention_heads=m.num_attention_heads, num_key_value_heads=m.num_query_groups,
                  head_dim=m.kv_channels or m.hidden_size // m.num_attention_heads,
                  max_position_embeddings=m.max_position_embeddings, rms_norm_eps=m.norm_epsilon,
                  rope_parameters={"rope_type": "default", "rope_theta": float(m.rotary_base)},
                  tie_word_embeddings=PRESETS[m.preset].TIE_EMBEDDINGS, num_experts=moe.num_experts,
                  num_experts_per_tok=moe.topk, moe_intermediate_size=moe.ffn_hidden_size,
                  intermediate_size=moe.ffn_hidden_size, router_aux_loss_coef=moe.aux_loss_coeff,
                  # top-k then softmax over the chosen = renormalised; softmax over all first = not
                  norm_topk_prob=not family["moe_router_pre_softmax"], decoder_sparse_step=1, mlp_only_layers=[],
                  architectures=[ARCHITECTURES[m.preset]], dtype=str(dtype).removeprefix("torch."))
    if m.preset == "qwen2_moe":
        return Qwen2MoeConfig(**common, shared_expert_intermediate_size=moe.shared_expert_ffn_hidden_size,
                              qkv_bias=True)
    return Qwen3MoeConfig(**common, attention_bias=False)


def config_overrides(hf) -> list[str]:
    """The model-defining settings of a transformers config, as this system's overrides (the
    inverse of `hf_config`); a field this adapter cannot represent is refused by name."""
    preset = {arch: preset for preset, arch in ARCHITECTURES.items()}.get((hf.architectures or [None])[0])
    if preset is None:
        raise UserError(f"architectures={hf.architectures} is not a Qwen MoE model: this adapter converts "
                        f"{', '.join(ARCHITECTURES.values())}")
    unsupported = {"mlp_only_layers": hf.mlp_only_layers, "decoder_sparse_step": hf.decoder_sparse_step != 1,
                   "use_sliding_window": hf.use_sliding_window,
                   "rope_parameters.rope_type": hf.rope_parameters.get("rope_type", "default") != "default",
                   "tie_word_embeddings": hf.tie_word_embeddings,
                   # the family fixes these: Qwen3 renormalises the top-k (k > 1), Qwen2 does not
                   "norm_topk_prob": hf.norm_topk_prob != (preset == "qwen3_moe" and hf.num_experts_per_tok > 1),
                   "attention_bias": getattr(hf, "qkv_bias", getattr(hf, "attention_bias", False))
                   != (preset == "qwen2_moe")}
    for field, present in unsupported.items():
        if present:
            raise UserError(f"the Hugging Face config sets {field}, which this system's {preset} model does not "
                            "have: convert a model without it")
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    overrides = {"model.preset": preset, "model.num_layers": hf.num_hidden_layers, "model.hidden_size": hf.hidden_size,
                 "model.num_attention_heads": hf.num_attention_heads,
                 "model.num_query_groups": hf.num_key_value_heads, "model.kv_channels": head_dim,
                 "model.max_position_embeddings": hf.max_position_embeddings,
                 "model.norm_epsilon": hf.rms_norm_eps, "model.rotary_base": int(hf.rope_parameters["rope_theta"]),
                 # padding to a multiple that divides the vocabulary keeps its size (up to 128)
                 "model.vocab_size": hf.vocab_size,
                 "model.make_vocab_size_divisible_by": math.gcd(hf.vocab_size, 128), "moe.variant": "topk", "moe.num_experts": hf.num_experts,
                 "moe.topk": hf.num_experts_per_tok, "moe.ffn_hidden_size": hf.moe_intermediate_size,
                 "moe.aux_loss_coeff": hf.router_aux_loss_coef}
    if preset == "qwen2_moe":
        overrides["moe.shared_expert_ffn_hidden_size"] = hf.shared_expert_intermediate_size
    return [f"{key}={value}" for key, value in overrides.items()]


# Tensors of a layer that convert together (any other converts alone), in either direction: a
# stacked expert tensor and its SD-MoE common part; the per-expert tensors of one stacked tensor;
# Q, K and V; a shared expert's gate and up projections.
_TOGETHER = [(r"mlp\.experts\.(?:linear|common)_(fc\d)", r"experts.\1"),
             (r"mlp\.experts\.\d+\.(?:gate|up)_proj\.weight", "experts.fc1"),
             (r"mlp\.experts\.\d+\.down_proj\.weight", "experts.fc2"),
             (r"self_attn\.[qkv]_proj\.(\w+)", r"qkv.\1"),
             (r"mlp\.shared_expert\.(?:gate|up)_proj\.weight", "shared_expert.fc1")]


def layer_index(name: str) -> int:
    """The layer of a conversion group's prefix: decoder.layers.<i> or model.layers.<i>."""
    return int(name.split(".")[2])


def conversion_group(key: str) -> str:
    """The group a layer's tensor (name relative to the layer) converts in."""
    for pattern, group in _TOGETHER:
        match = re.fullmatch(pattern, key)
        if match:
            return match.expand(group)
    return key


def to_hf(cfg: Config, name: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`name`: a global tensor's name, or `decoder.layers.<i>` with `tensors` some of that layer's
    (names relative to it; a conversion group at least). Returns the transformers tensors they become."""
    if name in GLOBAL_NAMES:
        return {GLOBAL_NAMES[name]: tensors[name]}
    prefix, out = f"model.layers.{layer_index(name)}.", {}
    for key in tensors:
        if key in _RENAMED:
            out[prefix + _RENAMED[key]] = tensors[key]
        elif key.startswith("self_attention.linear_qkv."):
            out.update({f"{prefix}self_attn.{p}_proj.{key.rsplit('.', 1)[1]}": t
                        for p, t in zip("qkv", _split_qkv(cfg, tensors[key]))})
        elif key == "mlp.shared_experts.linear_fc1.weight":
            gate, up = tensors[key].chunk(2)
            out.update({f"{prefix}mlp.shared_expert.gate_proj.weight": gate,
                        f"{prefix}mlp.shared_expert.up_proj.weight": up})
    out.update(experts_to_hf(prefix, tensors))
    return out


def from_hf(cfg: Config, name: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of `to_hf`: transformers tensors (a global one, or `model.layers.<i>` with some of
    that layer's, names relative to it) -> this system's whole tensors (routed experts as plain ones)."""
    globals_ = {hf: ours for ours, hf in GLOBAL_NAMES.items()}
    if name in globals_:
        return {globals_[name]: tensors[name]}
    prefix, renamed = f"decoder.layers.{layer_index(name)}.", {hf: ours for ours, hf in _RENAMED.items()}
    out = {prefix + renamed[key]: tensors[key] for key in tensors if key in renamed}
    for part in ("weight", "bias"):
        if f"self_attn.q_proj.{part}" in tensors:
            out[f"{prefix}self_attention.linear_qkv.{part}"] = _merge_qkv(
                cfg, *(tensors[f"self_attn.{p}_proj.{part}"] for p in "qkv"))
    if "mlp.shared_expert.gate_proj.weight" in tensors:
        out[prefix + "mlp.shared_experts.linear_fc1.weight"] = torch.cat(
            [tensors["mlp.shared_expert.gate_proj.weight"], tensors["mlp.shared_expert.up_proj.weight"]])
    for fc, projections in EXPERT_PROJECTIONS.items():
        if f"mlp.experts.0.{projections[0]}.weight" in tensors:
            out[f"{prefix}mlp.experts.linear_{fc}"] = _stacked(tensors, projections, cfg.moe.num_experts)
    return out


def _stacked(tensors, projections: tuple[str, ...], experts: int) -> torch.Tensor:
    """[experts, rows of every projection, ...], filled one transformers tensor at a time (`tensors`
    may read lazily: only one is held besides the result)."""
    first = tensors[f"mlp.experts.0.{projections[0]}.weight"]
    rows = first.shape[0]
    out = first.new_empty(experts, rows * len(projections), *first.shape[1:])
    for e in range(experts):
        for i, projection in enumerate(projections):
            out[e, i * rows:(i + 1) * rows] = tensors[f"mlp.experts.{e}.{projection}.weight"]
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


# stacked expert tensor -> the per-expert transformers projections it holds, in row order
EXPERT_PROJECTIONS = {"fc1": ("gate_proj", "up_proj"), "fc2": ("down_proj",)}


def experts_to_hf(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Stacked routed experts -> one gate / up / down weight per expert (SD-MoE: C + U_e)."""
    out = {}
    for fc, projections in EXPERT_PROJECTIONS.items():
        if f"mlp.experts.linear_{fc}" not in tensors:
            continue
        stacked = tensors[f"mlp.experts.linear_{fc}"]
        if f"mlp.experts.common_{fc}" in tensors:  # SD-MoE: [groups, ...] commons, consecutive experts per group
            common = tensors[f"mlp.experts.common_{fc}"]
            stacked = stacked + common.repeat_interleave(len(stacked) // len(common), 0)
        for e, weight in enumerate(stacked):
            out.update({f"{prefix}mlp.experts.{e}.{p}.weight": w for p, w in zip(projections, weight.chunk(len(projections)))})
    return out
