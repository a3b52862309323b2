"""DeepSeek-V2/V3-like family: RMSNorm, RoPE, multi-head latent attention (`model.attention: mla`)
or GQA, fine-grained SwiGLU routed experts plus ungated shared experts, the first
`model.dense_layers` layers dense. Routing defaults to V3's:
sigmoid scores normalised over the chosen k, scaled by `moe.routed_scaling_factor`, with
auxiliary-loss-free balancing (`moe.expert_bias_update_rate`), group-limited routing
(`moe.num_groups`, `moe.group_topk`) and the sequence-level aux loss (`moe.aux_loss_type`). With
`moe.score_function: softmax` it routes like V2 (softmax over all experts, top-k not renormalised).
Multi-token prediction is `model.mtp_layers`. MLA is megatron-core's MLASelfAttention with this
project's core attention (models/attention.py), which takes its separate key and value head sizes.
"""
from __future__ import annotations

from megatron_sdmoe.config import Config
from megatron_sdmoe.models.common import RMSNORM_SWIGLU

SCORE_FUNCTION = "sigmoid"  # the default of moe.score_function


def transformer_kwargs(cfg: Config) -> dict:
    return dict(
        **RMSNORM_SWIGLU,
        qk_layernorm=cfg.model.attention == "mla",  # MLA: RMSNorm on the query and key/value latents
        add_qkv_bias=False,
        moe_router_pre_softmax=True,  # softmax scores (V2): over all experts, top-k kept as they are
        moe_shared_expert_gate=False,
    )
