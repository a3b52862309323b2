"""Head-wise models (moe.variant: headwise | headwise_sdmoe) to transformers and back.
transformers has no head-wise MoE class, so the export carries this project's own modelling code
(headwise_modeling.py, next to the weights and named in config.json's auto_map): the family's
transformers config plus `headwise`, the routing settings that code reads. Loading needs
`trust_remote_code=True`, and the unique model_type makes loading without it fail rather than
build a plain MoE model. Importing reads such a config with this package's copy of the classes,
so no code from the model directory runs.
"""
from __future__ import annotations

from pathlib import Path

from megatron_sdmoe.config import Config, expert_ffn_hidden_size, router_bank_size, routed_topk
from megatron_sdmoe.convert.mapping import BIAS_UPDATE_RATE

MODELING = Path(__file__).with_name("headwise_modeling.py")
# the family's transformers class -> the head-wise one in headwise_modeling.py
CLASSES = {"Qwen3MoeForCausalLM": "HeadwiseQwen3MoeForCausalLM", "Qwen2MoeForCausalLM": "HeadwiseQwen2MoeForCausalLM",
           "DeepseekV3ForCausalLM": "HeadwiseDeepseekV3ForCausalLM"}


def routing(cfg: Config) -> dict:
    """What headwise_modeling.py needs to route as megatron-core does in training."""
    from megatron_sdmoe.models import PRESETS
    from megatron_sdmoe.models.common import score_function

    moe, hw = cfg.moe, cfg.headwise
    return {"heads": hw.heads, "experts_per_head": router_bank_size(cfg), "topk": routed_topk(cfg),
            "ffn_hidden_size": expert_ffn_hidden_size(cfg), "bank": hw.bank, "score_function": score_function(cfg),
            "pre_softmax": PRESETS[cfg.model.preset].transformer_kwargs(cfg)["moe_router_pre_softmax"],
            "num_groups": moe.num_groups, "group_topk": moe.group_topk, "scaling_factor": moe.routed_scaling_factor,
            "expert_bias": moe.expert_bias_update_rate > 0, "router_dtype": moe.router_dtype}


def hf_config(cfg: Config, family_config):
    """The family's transformers config as the head-wise class's, with `headwise` and auto_map."""
    from megatron_sdmoe.convert import headwise_modeling

    architecture = CLASSES[family_config.architectures[0]]
    config_class = getattr(headwise_modeling, architecture).config_class
    fields = {k: v for k, v in family_config.to_dict().items() if k not in ("model_type", "transformers_version")}
    module = MODELING.stem
    return config_class(**{**fields, "architectures": [architecture], "headwise": routing(cfg),
                           "auto_map": {"AutoConfig": f"{module}.{config_class.__name__}",
                                        "AutoModelForCausalLM": f"{module}.{architecture}"}})


def config_class(model_type: str | None):
    """This package's config class of a head-wise export's model_type, or None for any other."""
    from megatron_sdmoe.convert import headwise_modeling

    classes = [getattr(headwise_modeling, name).config_class for name in CLASSES.values()]
    return next((c for c in classes if c.model_type == model_type), None)


def family_architecture(architecture: str) -> str:
    """The family's transformers class of a head-wise one (any other name as it is)."""
    return {ours: family for family, ours in CLASSES.items()}.get(architecture, architecture)


def config_overrides(hf) -> list[str]:
    """The head-wise settings of an export's config (after the family adapter's overrides)."""
    r = hf.headwise
    overrides = {"moe.variant": "headwise", "headwise.heads": r["heads"],
                 "headwise.experts_per_head": r["experts_per_head"], "headwise.topk": r["topk"],
                 "headwise.ffn_hidden_size": r["ffn_hidden_size"], "headwise.bank": r["bank"],
                 "moe.score_function": r["score_function"], "moe.num_groups": r["num_groups"],
                 "moe.group_topk": r["group_topk"], "moe.routed_scaling_factor": r["scaling_factor"],
                 "moe.expert_bias_update_rate": BIAS_UPDATE_RATE if r["expert_bias"] else 0,
                 "moe.router_dtype": r["router_dtype"]}
    return [f"{key}={value}" for key, value in overrides.items()]
