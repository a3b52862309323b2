"""Multi-head latent attention that is exact under tensor parallelism.

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
"""
from __future__ import annotations

from megatron.core.tensor_parallel.mappings import (gather_from_tensor_model_parallel_region,
                                                    scatter_to_sequence_parallel_region)
from megatron.core.transformer.multi_latent_attention import MLASelfAttention


class TensorParallelMLASelfAttention(MLASelfAttention):
    def _qkv_down_projection(self, hidden_states):
        q_compressed, kv_combined = super()._qkv_down_projection(hidden_states)
        if kv_combined.size(-1) != self.config.kv_lora_rank + self.config.qk_pos_emb_head_dim:
            kv_combined = gather_from_tensor_model_parallel_region(kv_combined, group=self.tp_group)
            if self.config.sequence_parallel:
                kv_combined = scatter_to_sequence_parallel_region(kv_combined, group=self.tp_group)
        return q_compressed, kv_combined
