"""Grouped-GEMM experts vs megatron-core's SequentialMLP: forward + backward time of one MoE
layer's local experts on the same tokens, fp32 on CPU (bf16 on GPU when one is present).

    .venv/bin/python benchmarks/grouped_experts.py [--tokens 4096 --hidden 256 --ffn 512]
"""
import argparse

import torch
import torch.nn.functional as F
from torch.utils import benchmark

from megatron_sdmoe.moe.experts import GroupedExperts, sequential_reference
from megatron_sdmoe.runtime import init_distributed, seed_everything, shutdown


def layer_config(experts: int, hidden: int, ffn: int, dtype: torch.dtype):
    """megatron-core's config of one MoE layer's SwiGLU experts (shared with sdmoe_layer.py)."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(num_layers=1, hidden_size=hidden, num_attention_heads=4, ffn_hidden_size=ffn,
                             moe_ffn_hidden_size=ffn, num_moe_experts=experts, gated_linear_unit=True,
                             activation_func=F.silu, add_bias_linear=False, params_dtype=dtype,
                             bf16=dtype == torch.bfloat16, use_cpu_initialization=not torch.cuda.is_available(),
                             bias_activation_fusion=False, gradient_accumulation_fusion=False)


def init_weights(module: GroupedExperts) -> GroupedExperts:
    with torch.no_grad():
        torch.nn.init.normal_(module.linear_fc1, std=0.02)
        torch.nn.init.normal_(module.linear_fc2, std=0.02)
    return module


def routed_tokens(experts: int, tokens: int, hidden: int, device: str, dtype: torch.dtype, seed: int = 0):
    """Inputs of one experts call: tokens sorted by expert (uniform routing), their per-expert
    counts, routing probabilities, and a dense output gradient."""
    gen = torch.Generator().manual_seed(seed)
    tokens_per_expert = torch.bincount(torch.multinomial(torch.ones(experts), tokens, replacement=True,
                                                         generator=gen), minlength=experts)
    x = torch.randn(tokens, hidden, generator=gen).to(device, dtype).requires_grad_()
    probs = torch.rand(tokens, generator=gen).to(device)
    grad_out = torch.randn(tokens, hidden, generator=gen).to(device, dtype)
    return x, tokens_per_expert, probs, grad_out


def build(experts: int, hidden: int, ffn: int, dtype: torch.dtype):
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection

    config, pgs = layer_config(experts, hidden, ffn, dtype), get_default_pg_collection()
    return sequential_reference(experts, config, pgs), init_weights(GroupedExperts(experts, config, pg_collection=pgs))


def step(module, x, tokens_per_expert, probs, grad_out):
    out, _ = module(x, tokens_per_expert, probs)
    out.backward(grad_out)  # a dense gradient, as in training (CUDA's grouped GEMM rejects stride-0 ones)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--ffn", type=int, default=512)
    parser.add_argument("--experts", type=int, nargs="+", default=[8, 16, 32, 64])
    args = parser.parse_args()
    init_distributed(1, 1, 1)
    seed_everything(0)  # megatron-core's GPU init draws from its RNG tracker
    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if cuda else torch.float32
    device = "cuda" if cuda else "cpu"
    print(f"device {torch.cuda.get_device_name() if cuda else 'cpu'} ({torch.get_num_threads()} threads), {dtype}, "
          f"tokens {args.tokens}, hidden {args.hidden}, ffn {args.ffn}")
    print("| experts | sequential ms | grouped ms | sequential / grouped |\n| --- | --- | --- | --- |")
    for experts in args.experts:
        sequential, grouped = build(experts, args.hidden, args.ffn, dtype)
        x, tokens_per_expert, probs, grad_out = routed_tokens(experts, args.tokens, args.hidden, device, dtype)
        times = []
        for module in (sequential, grouped):
            timer = benchmark.Timer("step(m, x, t, p, g)", globals={"step": step, "m": module, "x": x, "g": grad_out,
                                                                    "t": tokens_per_expert, "p": probs})
            times.append(timer.blocked_autorange(min_run_time=2.0).median * 1e3)
        print(f"| {experts} | {times[0]:.1f} | {times[1]:.1f} | {times[0] / times[1]:.2f} |", flush=True)
    shutdown()


if __name__ == "__main__":
    main()
