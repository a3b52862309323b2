"""Grouped-GEMM experts against megatron-core's SequentialMLP (the reference implementation):
same outputs and gradients in fp32 for the same weights, including experts that get no tokens."""
import torch
import torch.nn.functional as F

from megatron_sdmoe.moe.experts import GroupedExperts, sequential_reference


def test_grouped_matches_sequential(single_process_groups):
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection
    from megatron.core.transformer.transformer_config import TransformerConfig

    experts, hidden, ffn = 6, 32, 48
    config = TransformerConfig(num_layers=1, hidden_size=hidden, num_attention_heads=4, ffn_hidden_size=ffn,
                               moe_ffn_hidden_size=ffn, num_moe_experts=experts, gated_linear_unit=True,
                               activation_func=F.silu, add_bias_linear=False, use_cpu_initialization=True,
                               bias_activation_fusion=False, gradient_accumulation_fusion=False)
    pgs = get_default_pg_collection()
    sequential = sequential_reference(experts, config, pgs)
    grouped = GroupedExperts(experts, config, pg_collection=pgs)
    with torch.no_grad():
        for e, expert in enumerate(sequential.local_experts):
            grouped.linear_fc1[e].copy_(expert.linear_fc1.weight)
            grouped.linear_fc2[e].copy_(expert.linear_fc2.weight)

    gen = torch.Generator().manual_seed(0)
    tokens_per_expert = torch.tensor([5, 0, 9, 1, 0, 7])
    x = torch.randn(int(tokens_per_expert.sum()), hidden, generator=gen)
    probs = torch.rand(x.shape[0], generator=gen)
    grad_out = torch.randn(x.shape[0], hidden, generator=gen)

    def run(module):
        xi = x.clone().requires_grad_()
        out, bias = module(xi, tokens_per_expert, probs)
        assert bias is None
        out.backward(grad_out)
        return out.detach(), xi.grad

    (ref_out, ref_dx), (out, dx) = run(sequential), run(grouped)
    torch.testing.assert_close(out, ref_out, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(dx, ref_dx, rtol=1e-6, atol=1e-6)
    for e, expert in enumerate(sequential.local_experts):
        torch.testing.assert_close(grouped.linear_fc1.grad[e], expert.linear_fc1.weight.grad, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(grouped.linear_fc2.grad[e], expert.linear_fc2.weight.grad, rtol=1e-6, atol=1e-6)
    assert grouped.linear_fc1.grad[1].abs().sum() == 0  # an expert without tokens gets no gradient
