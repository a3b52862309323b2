"""SD-MoE's cost inside one MoE layer: the grouped experts' forward + backward over the micro-batches
of one optimizer step, topk (GroupedExperts) against sdmoe (SDMoEExperts: W = C + U, gradient
routing), on the same tokens; fp32 on the CPU, bf16 on a GPU. A step's gradients are dropped after
it, as the optimizer step takes them. The ratio bounds SD-MoE's step-time overhead from above:
the rest of a step (attention, routing, dispatch, optimizer) is the same in both.

    .venv/bin/python benchmarks/sdmoe_layer.py [--tokens 8192 --hidden 1536 --ffn 384 --experts 32 \
        --topk 2 --micro-batches 4 --rank 8]

Defaults: one layer of configs/sdmoe-2b.yaml on one GPU (micro-batch 2 x 4,096 tokens, top-2).
"""
import argparse

import torch
from grouped_experts import init_weights, layer_config, routed_tokens
from torch.utils import benchmark

from megatron_sdmoe.config import SDMoEConfig
from megatron_sdmoe.moe.experts import GroupedExperts
from megatron_sdmoe.moe.sdmoe import SDMoEExperts
from megatron_sdmoe.runtime import init_distributed, seed_everything, shutdown


def step(module: GroupedExperts, micro_batches: list) -> None:
    for i, (x, tokens_per_expert, probs, grad_out) in enumerate(micro_batches):
        module.more_micro_batches = i < len(micro_batches) - 1  # what the training loop sets (SD-MoE)
        out, _ = module(x, tokens_per_expert, probs)
        out.backward(grad_out)
    module.zero_grad(set_to_none=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=8192, help="tokens per micro-batch")
    parser.add_argument("--hidden", type=int, default=1536)
    parser.add_argument("--ffn", type=int, default=384)
    parser.add_argument("--experts", type=int, default=32)
    parser.add_argument("--topk", type=int, default=2)
    parser.add_argument("--micro-batches", type=int, default=4)
    parser.add_argument("--rank", type=int, default=8)
    args = parser.parse_args()
    init_distributed(1, 1, 1)
    seed_everything(0)
    cuda = torch.cuda.is_available()
    dtype, device = (torch.bfloat16, "cuda") if cuda else (torch.float32, "cpu")
    config = layer_config(args.experts, args.hidden, args.ffn, dtype)
    topk = init_weights(GroupedExperts(args.experts, config))
    sdmoe = init_weights(SDMoEExperts(args.experts, config, sdmoe=SDMoEConfig(rank=args.rank), seed=0))
    sdmoe.layer_key = "layer"
    sdmoe.split_initial_weights()
    micro_batches = [routed_tokens(args.experts, args.tokens * args.topk, args.hidden, device, dtype, seed)
                     for seed in range(args.micro_batches)]
    times = {}
    for name, module in (("topk", topk), ("sdmoe", sdmoe)):
        timer = benchmark.Timer("step(m, b)", globals={"step": step, "m": module, "b": micro_batches})
        times[name] = timer.blocked_autorange(min_run_time=3.0).median * 1e3
    print(f"device {torch.cuda.get_device_name() if cuda else 'cpu'} ({torch.get_num_threads()} threads), {dtype}; "
          f"{args.experts} experts, hidden {args.hidden}, ffn {args.ffn}, {args.micro_batches} micro-batches of "
          f"{args.tokens} tokens x top-{args.topk}, rank {args.rank}")
    print(f"| topk ms per step | sdmoe ms per step | sdmoe / topk |\n| --- | --- | --- |\n"
          f"| {times['topk']:.1f} | {times['sdmoe']:.1f} | {times['sdmoe'] / times['topk']:.3f} |")
    shutdown()


if __name__ == "__main__":
    main()
