"""Causal core attention on torch's scaled_dot_product_attention.

Written here because megatron-core 0.19.2 offers no Transformer-Engine-free core attention that
(a) avoids materialising the [batch, heads, s, s] score matrix (its local DotProductAttention
stores it, which costs memory quadratic in the sequence and, on GPUs, most of the attention time)
and (b) takes separate query/key and value head sizes, which multi-head latent attention needs.
torch's kernel does both: flash or memory-efficient kernels on GPUs, a fused kernel on CPUs.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig


class SDPAttention(MegatronModule):
    """Drop-in for megatron-core's core attention in a layer spec: [s, b, heads, d] query, key and
    value (key/value with fewer heads under GQA) -> [s, b, heads * d_v]."""

    def __init__(self, config: TransformerConfig, layer_number: int, attn_mask_type: AttnMaskType,
                 attention_type: str, attention_dropout: float | None = None, softmax_scale: float | None = None,
                 k_channels: int | None = None, v_channels: int | None = None, cp_comm_type: str | None = None,
                 pg_collection=None):
        super().__init__(config=config)
        assert attn_mask_type == AttnMaskType.causal, "SDPAttention is causal self-attention"
        dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        assert dropout == 0.0, "SDPAttention has no attention dropout (pretraining here runs without)"
        self.softmax_scale = softmax_scale or 1.0 / math.sqrt(k_channels or config.kv_channels)
        # megatron-core's MLA reads and restores this attribute around the call
        self.hidden_size_per_attention_head_v = v_channels or config.kv_channels

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask=None,
                attn_mask_type=None, attention_bias=None, packed_seq_params=None) -> torch.Tensor:
        """attention_mask: None (causal), or [b, 1, s, s] with True where a query may not attend
        (megatron-core's convention; document_attention_mask builds it, causal included)."""
        assert attention_bias is None and packed_seq_params is None, "SDPAttention: no bias, no packed sequences"
        seq, batch = query.shape[:2]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads, s, d]
        # with a mask torch takes its memory-efficient kernel (flash attention takes no masks)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=None if attention_mask is None else ~attention_mask,
                                             is_causal=attention_mask is None, scale=self.softmax_scale,
                                             enable_gqa=q.shape[1] != k.shape[1])
        return out.permute(2, 0, 1, 3).reshape(seq, batch, -1)


def document_attention_mask(cu_seqlens: torch.Tensor, seq_length: int) -> torch.Tensor:
    """cu_seqlens [b, n] (each sample's document starts, then its length, padded with it: megatron-core's
    GPTDataset with inter_document_masking) -> [b, 1, s, s], True where query i may not attend to key
    j: j after i, or in another document."""
    positions = torch.arange(seq_length, device=cu_seqlens.device)
    document = torch.searchsorted(cu_seqlens.contiguous(), positions.expand(len(cu_seqlens), -1).contiguous(),
                                  right=True)  # [b, s]: how many starts lie at or before each position
    later = positions[None, :] > positions[:, None]
    return (later | (document[:, :, None] != document[:, None, :]))[:, None]
