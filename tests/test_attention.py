"""Core attention: torch's fused kernel (models/attention.py) equals megatron-core's local
DotProductAttention in outputs and gradients."""
import pytest
import torch


@pytest.mark.parametrize("heads, groups", [(4, 4), (4, 2)])
def test_sdpa_attention_equals_megatron_dot_product_attention(single_process_groups, heads, groups):
    """models/attention.py against megatron-core's local DotProductAttention (causal, GQA, fp32)."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_sdmoe.models.attention import SDPAttention
    from megatron_sdmoe.runtime import seed_everything

    seed_everything(0)  # megatron-core's attention forks its (dropout) RNG state

    config = TransformerConfig(num_layers=1, hidden_size=64, num_attention_heads=heads, num_query_groups=groups,
                               use_cpu_initialization=True, masked_softmax_fusion=False, attention_dropout=0.0)
    args = dict(config=config, layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self")
    reference, ours = DotProductAttention(**args), SDPAttention(**args)
    s, b, d = 24, 3, 64 // heads
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(s, b, heads, d, generator=gen, requires_grad=True)
    k, v = (torch.randn(s, b, groups, d, generator=gen, requires_grad=True) for _ in range(2))
    causal = torch.triu(torch.ones(s, s, dtype=torch.bool), diagonal=1)[None, None]  # True: masked
    want, got = reference(q, k, v, causal), ours(q, k, v, None)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    grad = torch.randn_like(want)
    want_grads = torch.autograd.grad(want, (q, k, v), grad)
    got_grads = torch.autograd.grad(got, (q, k, v), grad)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
