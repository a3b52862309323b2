"""What every family's mapping to Hugging Face transformers shares, for whole (unsharded) tensors,
one conversion group of a layer at a time: the global names, the renamed per-layer tensors, the
SwiGLU [gate; up] stacks megatron-core fuses, the stacked routed experts (SD-MoE: exported as
common + unique), and the config fields every family reads the same way.

A family adapter (qwen.py, deepseek.py) is its tables, `RENAMED` (ours -> transformers, names
within a layer, besides `LAYER_NAMES`) and `GATE_UP` (our stacked fc1 -> the transformers prefix
of its gate_proj / up_proj), plus what only it has.
"""
from __future__ import annotations

import functools
import math
import re

import torch

from megatron_sdmoe.convert import fp8
from megatron_sdmoe.errors import UserError

GLOBAL_NAMES = {"embedding.word_embeddings.weight": "model.embed_tokens.weight",
                "decoder.final_layernorm.weight": "model.norm.weight", "output_layer.weight": "lm_head.weight"}
# every family's names within a layer: the router (DeepSeek-V3's routing bias), head-wise routing's
# shared-bank projections (headwise_modeling.py)
LAYER_NAMES = {"mlp.router.weight": "mlp.gate.weight", "mlp.router.expert_bias": "mlp.gate.e_score_correction_bias",
               "mlp.mix_proj": "mlp.mix_proj.weight", "mlp.merge_proj": "mlp.merge_proj.weight"}
# an imported routing bias needs bias balancing on to exist: at DeepSeek-V3's update speed
BIAS_UPDATE_RATE = 0.001
# stacked expert tensor -> the per-expert transformers projections it holds, in row order
EXPERT_PROJECTIONS = {"fc1": ("gate_proj", "up_proj"), "fc2": ("down_proj",)}

# Tensors of a layer that convert together (any other converts alone), in either direction: a
# stacked expert tensor and its SD-MoE common part; the per-expert tensors of one stacked tensor;
# Q, K and V; a (shared expert's or dense) SwiGLU's gate and up projections.
_TOGETHER = [(r"mlp\.experts\.(?:linear|common)_(fc\d)", r"experts.\1"),
             (r"mlp\.experts\.\d+\.(?:gate|up)_proj\.weight", "experts.fc1"),
             (r"mlp\.experts\.\d+\.down_proj\.weight", "experts.fc2"),
             (r"self_attn\.[qkv]_proj\.(\w+)", r"qkv.\1"),
             (r"mlp\.((?:shared_experts?\.)?)(?:gate|up)_proj\.weight", r"\1fc1")]


# Multi-token-prediction layer k is transformers' layer <num_layers + k> (DeepSeek-V3's checkpoints:
# its own norms and projection, then a decoder layer's tensors; transformers' classes do not run
# it). Ours: mtp.layers.<k>.{MTP_OWN} and mtp.layers.<k>.mtp_model_layer.<a decoder layer's names>.
MTP_OWN = ("enorm.weight", "hnorm.weight", "eh_proj.weight", "final_layernorm.weight")
MTP_LAYER = "mtp_model_layer."
# DeepSeek's checkpoints repeat the embedding and output layer in each MTP layer; megatron-core's
# MTP shares the model's, as DeepSeek-V3 trains it, so importing leaves the copies out unread
MTP_COPIES = ("embed_tokens.weight", "shared_head.head.weight")


def layer_index(name: str) -> int:
    """The layer of a conversion group's prefix: decoder.layers.<i>, mtp.layers.<k> or model.layers.<i>."""
    return int(name.split(".")[2])


def hf_layer_prefix(name: str, num_layers: int) -> str:
    """transformers' prefix of our decoder or MTP layer group `name`."""
    mtp = name.startswith("mtp.")
    return f"model.layers.{layer_index(name) + num_layers * mtp}."


def our_layer_prefix(name: str, num_layers: int, key: str) -> str:
    """Our prefix of tensor `key` (ours, within the layer) of transformers' layer group `name`."""
    index = layer_index(name)
    if index < num_layers:
        return f"decoder.layers.{index}."
    return f"mtp.layers.{index - num_layers}." + ("" if key in MTP_OWN else MTP_LAYER)


def conversion_group(key: str) -> str:
    """The group a layer's tensor (name relative to the layer) converts in."""
    for pattern, group in _TOGETHER:
        match = re.fullmatch(pattern, key)
        if match:
            return match.expand(group)
    return key


def to_hf(name: str, tensors, renamed: dict[str, str], gate_up: dict[str, str],
          num_layers: int) -> dict[str, torch.Tensor]:
    """`name`: a global tensor's name, or `decoder.layers.<i>` / `mtp.layers.<k>` with `tensors`
    some of that layer's (names relative to it, an MTP layer's decoder layer unprefixed; a
    conversion group at least). Returns the transformers tensors of those this module knows (the
    adapter adds the rest)."""
    if name in GLOBAL_NAMES:
        return {GLOBAL_NAMES[name]: tensors[name]}
    prefix, out, renamed = hf_layer_prefix(name, num_layers), {}, {**LAYER_NAMES, **renamed}
    for key in tensors:
        if key in renamed:
            out[prefix + renamed[key]] = tensors[key]
        elif key in gate_up:
            gate, up = tensors[key].chunk(2)
            out.update({f"{prefix}{gate_up[key]}gate_proj.weight": gate, f"{prefix}{gate_up[key]}up_proj.weight": up})
    for fc, projections in EXPERT_PROJECTIONS.items():
        if f"mlp.experts.linear_{fc}" not in tensors:
            continue
        stacked = tensors[f"mlp.experts.linear_{fc}"]
        if f"mlp.experts.common_{fc}" in tensors:  # SD-MoE: [groups, ...] commons, consecutive experts per group
            common = tensors[f"mlp.experts.common_{fc}"]
            stacked = stacked + common.repeat_interleave(len(stacked) // len(common), 0)
        for e, weight in enumerate(stacked):
            out.update({f"{prefix}mlp.experts.{e}.{p}.weight": w
                        for p, w in zip(projections, weight.chunk(len(projections)))})
    return out


def from_hf(name: str, tensors, renamed: dict[str, str], gate_up: dict[str, str], experts: int,
            num_layers: int) -> dict[str, torch.Tensor]:
    """The inverse of `to_hf` (routed experts come back as plain ones, `experts` of them)."""
    globals_ = {hf: ours for ours, hf in GLOBAL_NAMES.items()}
    if name in globals_:
        return {globals_[name]: tensors[name]}
    prefix, renamed = functools.partial(our_layer_prefix, name, num_layers), {**LAYER_NAMES, **renamed}
    out = {prefix(ours) + ours: tensors[hf] for ours, hf in renamed.items() if hf in tensors}
    out.update({prefix(ours) + ours: torch.cat([tensors[f"{hf}gate_proj.weight"], tensors[f"{hf}up_proj.weight"]])
                for ours, hf in gate_up.items() if f"{hf}gate_proj.weight" in tensors})
    for fc, projections in EXPERT_PROJECTIONS.items():
        if f"mlp.experts.0.{projections[0]}.weight" in tensors:
            key = f"mlp.experts.linear_{fc}"
            out[prefix(key) + key] = _stacked(tensors, projections, experts)
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


def refuse_unsupported(preset: str, fields: dict[str, bool]) -> None:
    """One line naming the first transformers config field (True: set) this system's model lacks."""
    for field, present in fields.items():
        if present:
            raise UserError(f"the Hugging Face config sets {field}, which this system's {preset} model does not "
                            "have: convert a model without it")


def shared_unsupported(hf) -> dict[str, bool]:
    """The fields no family here supports."""
    rope = hf.rope_parameters or {}
    yarn = rope.get("rope_type") == "yarn"
    return {"rope_parameters.rope_type other than default or yarn": rope.get("rope_type", "default") not in
            ("default", "yarn"),
            # a set attention factor replaces the one YaRN derives; megatron-core always truncates
            "rope_parameters.attention_factor": yarn and rope.get("attention_factor") is not None,
            "rope_parameters.truncate=false": yarn and rope.get("truncate", True) is False,
            "rope_parameters.partial_rotary_factor": rope.get("partial_rotary_factor", 1.0) != 1.0,
            # transformers then scales cos/sin by m(1) but the softmax by m(mscale_all_dim)^2
            "rope_parameters.mscale_all_dim without mscale": yarn and bool(rope.get("mscale_all_dim"))
            and not rope.get("mscale"),
            "tie_word_embeddings": hf.tie_word_embeddings, "hidden_act": hf.hidden_act != "silu",
            "quantization_config other than block-wise fp8":
                getattr(hf, "quantization_config", None) is not None and fp8.block_size(hf) is None}


def shared_overrides(hf) -> dict[str, object]:
    """The settings every family reads the same way from a transformers config."""
    return {"model.num_layers": hf.num_hidden_layers, "model.hidden_size": hf.hidden_size,
            "model.num_attention_heads": hf.num_attention_heads,
            "model.max_position_embeddings": hf.max_position_embeddings, "model.norm_epsilon": hf.rms_norm_eps,
            "model.rotary_base": _rope_theta(hf), "model.vocab_size": hf.vocab_size,
            # padding to a multiple that divides the vocabulary keeps its size (up to 128)
            "model.make_vocab_size_divisible_by": math.gcd(hf.vocab_size, 128), "moe.variant": "topk",
            "moe.topk": hf.num_experts_per_tok, **_rope_overrides(hf)}


def _rope_theta(hf) -> int:
    """rope_theta, a whole number as megatron-core's rotary_base (int) takes it: cut to one, another
    RoPE would train than the one imported."""
    theta = hf.rope_parameters.get("rope_theta")
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or not math.isfinite(theta) or theta != int(theta):
        raise UserError(f"config.json's rope_theta={theta!r} is not a whole number, which this system's RoPE base "
                        "needs: convert a model whose rope_theta is one")
    return int(theta)


def _rope_overrides(hf) -> dict[str, object]:
    rope = hf.rope_parameters
    if rope.get("rope_type") != "yarn":
        return {}
    original = rope["original_max_position_embeddings"]
    # transformers' defaults for what the config leaves out (mscale counts only with mscale_all_dim)
    return {"model.rope_scaling": "yarn", "model.yarn.factor": rope.get("factor") or hf.max_position_embeddings / original,
            "model.yarn.original_max_position_embeddings": original,
            "model.yarn.beta_fast": rope.get("beta_fast") or 32.0, "model.yarn.beta_slow": rope.get("beta_slow") or 1.0,
            "model.yarn.mscale": rope.get("mscale") or 1.0, "model.yarn.mscale_all_dim": rope.get("mscale_all_dim") or 0.0}


def rope_parameters(model) -> dict:
    """transformers' rope_parameters of `cfg.model` (model.rope_scaling: yarn with every field)."""
    params = {"rope_type": "default", "rope_theta": float(model.rotary_base)}
    if model.rope_scaling == "yarn":
        y = model.yarn
        params.update(rope_type="yarn", factor=y.factor, original_max_position_embeddings=y.original_max_position_embeddings,
                      beta_fast=y.beta_fast, beta_slow=y.beta_slow, mscale=y.mscale, mscale_all_dim=y.mscale_all_dim)
    return params
