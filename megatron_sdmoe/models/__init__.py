"""Model families: each preset gives megatron-core TransformerConfig settings and a layer spec."""
from __future__ import annotations

import logging
import warnings

import torch

from megatron_sdmoe.config import Config, is_sdmoe
from megatron_sdmoe.models import deepseek, qwen2_moe, qwen3_moe

PRESETS = {"deepseek": deepseek, "qwen2_moe": qwen2_moe, "qwen3_moe": qwen3_moe}


def padded_vocab_size(vocab_size: int, cfg: Config) -> int:
    """Pad to a multiple that does not depend on the layout, so every layout builds one model."""
    multiple = cfg.model.make_vocab_size_divisible_by
    return -(-vocab_size // multiple) * multiple


def yarn_settings(cfg: Config) -> dict:
    """model.yarn in megatron-core's YaRN terms. transformers scales cos/sin by m(mscale) /
    m(mscale_all_dim) only when mscale_all_dim is set, by m(1) otherwise; megatron-core always by
    the ratio, so without mscale_all_dim it gets mscale 1 (the ratio is then m(1) / m(0) = m(1))."""
    y = cfg.model.yarn
    return dict(rotary_scaling_factor=y.factor, original_max_position_embeddings=y.original_max_position_embeddings,
                beta_fast=y.beta_fast, beta_slow=y.beta_slow, mscale=y.mscale if y.mscale_all_dim else 1.0,
                mscale_all_dim=y.mscale_all_dim)


def mla_kwargs(cfg: Config) -> dict:
    """MLA's settings; its YaRN (softmax scale included) is MLASelfAttention's own."""
    mla, yarn = cfg.model.mla, cfg.model.rope_scaling == "yarn"
    return dict(q_lora_rank=mla.q_lora_rank, kv_lora_rank=mla.kv_lora_rank, qk_head_dim=mla.qk_head_dim,
                qk_pos_emb_head_dim=mla.qk_rope_head_dim, v_head_dim=mla.v_head_dim,
                rope_type="yarn" if yarn else "rope", rotary_base=cfg.model.rotary_base,
                **(yarn_settings(cfg) if yarn else {}))


def build_model(cfg: Config, vocab_size: int, dtype: torch.dtype, resuming: bool = False):
    """A megatron-core GPTModel with the preset's MoE layers, initialised layout-independently
    (`resuming`: left NaN for the checkpoint to fill, models/init.py: poison_weights).

    GPTModel, not HybridModel: in megatron-core 0.19.2 HybridModel's stack specs are built from
    Transformer Engine modules and treat MoE as a separate layer type, while GPTModel takes a local
    (TE-free) transformer-layer spec with the MoE MLP inside, which runs on CPU and GPU alike.
    """
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer.transformer_config import MLATransformerConfig, TransformerConfig

    from megatron_sdmoe.models.common import decoder_specs, shared_transformer_kwargs
    from megatron_sdmoe.models.init import init_weights, poison_weights
    from megatron_sdmoe.moe import sdmoe, token_dropping
    from megatron_sdmoe.runtime.agreement import agreed

    token_dropping.use_in_megatron_router()  # moe.token_drop_policy=position keeps the earliest tokens

    family = PRESETS[cfg.model.preset]
    with warnings.catch_warnings():  # megatron-core's own default CUDA-graph scope is deprecated
        warnings.filterwarnings("ignore", message="full scope is deprecated")
        kwargs = {**shared_transformer_kwargs(cfg, dtype), **family.transformer_kwargs(cfg)}
        mla = cfg.model.attention == "mla"
        config = MLATransformerConfig(**kwargs, **mla_kwargs(cfg)) if mla else TransformerConfig(**kwargs)
    # GQA's YaRN: GPTModel and attention read these by name; TransformerConfig has no such fields
    # in megatron-core 0.19.2 (Megatron-LM sets them on the config from its arguments, as here).
    gqa_yarn = not mla and cfg.model.rope_scaling == "yarn"
    if gqa_yarn:
        for key, value in yarn_settings(cfg).items():
            setattr(config, f"yarn_{key}", value)
        config.yarn_correction_range_round_to_int = True  # as transformers' `truncate` default
    block_spec, mtp_spec = decoder_specs(config, cfg)
    # GPTModel logs a deprecation warning pointing at HybridModel; the choice is explained above.
    gpt_logger = logging.getLogger("megatron.core.models.gpt.gpt_model")
    level, gpt_logger.level = gpt_logger.level, logging.ERROR
    try:
        model = GPTModel(config=config, transformer_layer_spec=block_spec, mtp_block_spec=mtp_spec,
                         vocab_size=padded_vocab_size(vocab_size, cfg),
                         max_sequence_length=cfg.model.max_position_embeddings,
                         position_embedding_type="yarn" if gqa_yarn else "rope", rotary_base=cfg.model.rotary_base,
                         share_embeddings_and_output_weights=False)  # untied, in every family
    finally:
        gpt_logger.setLevel(level)
    if resuming:
        poison_weights(model)
    else:  # model.init_from's files may fail to read on one rank alone
        agreed(lambda: init_weights(model, cfg))
    if is_sdmoe(cfg):
        sdmoe.prepare(model, imported=bool(cfg.model.init_from), split=not resuming)
    return model
