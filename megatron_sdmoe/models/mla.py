"""Multi-head latent attention that is exact under tensor parallelism, with or without a query
latent, on megatron-core's Transformer-Engine-free modules.

megatron-core 0.19.2 builds MLA's down projections column-parallel when Transformer Engine is
absent (its local layer spec). The key/value down projection's output is then gathered over TP and
the RoPE key, which every head shares, is used by each rank's heads only: backward keeps each
rank's own heads' share of that key's gradient and drops the rest (a TP2 run leaves one process's
losses from step 2 on). The query latent is not affected: megatron-core gathers it over TP and
scatters it back to the sequence-parallel layout, so its gradient is summed over ranks.

Here the key/value latent takes the query's path: gathered over TP, then scattered back to the
sequence-parallel layout, the layout Transformer Engine's duplicated down projection produces.
megatron-core's own code then gathers the RoPE key over the sequence, whose backward (a
reduce-scatter) sums every rank's heads' gradient. Forward values are unchanged; the weights keep
their column-parallel shards (checkpoints and conversion are unaffected).

Without a query latent (`model.mla.q_lora_rank` empty, DeepSeek-V2-Lite) megatron-core 0.19.2
takes the query projection from Transformer Engine's fused norm + linear, which carries the layer's
input norm, and fails to build without Transformer Engine. The local layer spec has the input norm
as a module of its own, so here the query projection is the spec's plain column-parallel one.

The latent norms take RMSNorm's default epsilon, 1e-6, whatever `model.norm_epsilon` is: DeepSeek's
own modelling code and transformers' build them so; megatron-core gives them the layers' epsilon.
"""
from __future__ import annotations

from megatron.core.tensor_parallel.mappings import (gather_from_tensor_model_parallel_region,
                                                    scatter_to_sequence_parallel_region)
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.multi_latent_attention import MLASelfAttention


LATENT_NORM_EPS = 1e-6


class TensorParallelMLASelfAttention(MLASelfAttention):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for norm in (getattr(self, "q_layernorm", None), self.kv_layernorm):  # no query latent: no q_layernorm
            if norm is not None:
                norm.eps = LATENT_NORM_EPS

    def _resolve_qk_norm_config(self, submodules) -> dict:
        if self.config.q_lora_rank is not None:
            return super()._resolve_qk_norm_config(submodules)
        return dict(linear_q_proj=submodules.linear_q_proj, linear_q_up_proj=IdentityOp,
                    linear_kv_up_proj=submodules.linear_kv_up_proj, q_layernorm=IdentityOp,
                    kv_layernorm=submodules.kv_layernorm)

    def _qkv_down_projection(self, hidden_states):
        q_compressed, kv_combined = super()._qkv_down_projection(hidden_states)
        if kv_combined.size(-1) != self.config.kv_lora_rank + self.config.qk_pos_emb_head_dim:
            kv_combined = gather_from_tensor_model_parallel_region(kv_combined, group=self.tp_group)
            if self.config.sequence_parallel:
                kv_combined = scatter_to_sequence_parallel_region(kv_combined, group=self.tp_group)
        return q_compressed, kv_combined
