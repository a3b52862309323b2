"""Grouped-GEMM SwiGLU experts: every local expert's weights in one stacked tensor per projection,
one `torch._grouped_mm` per projection over all local experts (CPU fp32/bf16 and Hopper GPUs).

A drop-in for megatron-core's SequentialMLP in the MoE layer spec: same call signature, same
tensor-parallel sharding (fc1 holds [gate_r; up_r] of expert-TP rank r, fc2 is split on its input
dim and returns partial sums that the token dispatcher reduces), and parameter attributes that
megatron-core and DeepSpeed read (`allreduce`, `tensor_model_parallel`, `partition_dim`, ...).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

# Stacked expert weights carry `stacked_experts = True`: dim 0 is the local expert index.
# models/init.py draws each slice as the expert of that global index would be drawn.


def expert_param(tensor: torch.Tensor, config: TransformerConfig, partition_dim: int, stride: int,
                 expert_tp_size: int) -> torch.nn.Parameter:
    param = torch.nn.Parameter(tensor)
    set_tensor_model_parallel_attributes(param, is_parallel=True, dim=partition_dim, stride=stride)
    # As megatron-core's expert linears: own (expert-data-parallel) groups when EP > 1 or ETP != TP.
    param.allreduce = not (config.expert_model_parallel_size > 1
                           or expert_tp_size != config.tensor_model_parallel_size)
    param.stacked_experts = True
    return param


def by_projection(fc1: torch.Tensor, fc2: torch.Tensor) -> dict[str, torch.Tensor]:
    """{gate, up, down}: views of stacked fc1-shaped [E, 2f, h] and fc2-shaped [E, h, f] tensors
    (weights or their gradients; this rank's shards)."""
    ffn = fc2.shape[-1]
    return {"gate": fc1[:, :ffn], "up": fc1[:, ffn:], "down": fc2}


def grouped_swiglu(x: torch.Tensor, fc1: torch.Tensor, fc2: torch.Tensor, tokens_per_expert: torch.Tensor,
                   probs: torch.Tensor) -> torch.Tensor:
    """x [T, h] sorted by expert; fc1 [E, 2f, h]; fc2 [E, h, f] -> [T, h] (probs applied before fc2)."""
    # megatron-core's dispatcher counts on the host; a blocking copy back would stall the GPU stream
    offsets = torch.cumsum(tokens_per_expert.to(device=x.device, non_blocking=True), dim=0).to(torch.int32)
    hidden = torch._grouped_mm(x, fc1.transpose(1, 2), offs=offsets)
    gate, up = hidden.chunk(2, dim=-1)
    hidden = (F.silu(gate) * up * probs.unsqueeze(-1)).to(x.dtype)
    return torch._grouped_mm(hidden, fc2.transpose(1, 2), offs=offsets)


class GroupedExperts(MegatronModule):
    """The local experts of one MoE layer (SwiGLU, no bias)."""

    weight_grads: dict | None = None  # set to {} by the diagnostics to collect a step's gradients

    def __init__(self, num_local_experts: int, config: TransformerConfig, pg_collection=None, name=None, *,
                 input_size: int | None = None, output_size: int | None = None):
        """input_size / output_size: the widths an expert reads and writes (default the hidden size;
        head-wise routing's experts read one head's slice)."""
        super().__init__(config=config)
        assert config.gated_linear_unit and config.activation_func is F.silu and not config.add_bias_linear, \
            "GroupedExperts implements bias-free SwiGLU experts"
        self.num_local_experts = num_local_experts
        etp = pg_collection.expt_tp.size() if pg_collection is not None else config.expert_tensor_parallel_size
        ffn = config.moe_ffn_hidden_size // etp
        self.input_size, self.output_size = input_size or config.hidden_size, output_size or config.hidden_size
        dtype, device = config.params_dtype, "cpu" if config.use_cpu_initialization else torch.cuda.current_device()
        self.linear_fc1 = expert_param(torch.empty(num_local_experts, 2 * ffn, self.input_size, dtype=dtype,
                                                   device=device), config, partition_dim=1, stride=2, expert_tp_size=etp)
        self.linear_fc2 = expert_param(torch.empty(num_local_experts, self.output_size, ffn, dtype=dtype,
                                                   device=device), config, partition_dim=2, stride=1, expert_tp_size=etp)

    def weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Effective fc1, fc2 weights (SD-MoE overrides this)."""
        return self.linear_fc1, self.linear_fc2

    def forward(self, permuted_local_hidden_states: torch.Tensor, tokens_per_expert: torch.Tensor,
                permuted_probs: torch.Tensor):
        fc1, fc2 = self.weights()
        if self.weight_grads is not None and torch.is_grad_enabled():
            fc1, fc2 = self._capture_grads(fc1, fc2)
        return grouped_swiglu(permuted_local_hidden_states, fc1, fc2, tokens_per_expert, permuted_probs), None

    def _capture_grads(self, fc1: torch.Tensor, fc2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add dL/dW of the effective weights into `weight_grads` (diagnostics); views, so the hooks
        live only as long as this forward's graph."""
        fc1, fc2 = fc1.view_as(fc1), fc2.view_as(fc2)
        for key, weight in (("fc1", fc1), ("fc2", fc2)):
            def add(grad, key=key):
                self.weight_grads[key] = self.weight_grads.get(key, 0) + grad.detach().float()
            weight.register_hook(add)
        return fc1, fc2

    def backward_dw(self):  # megatron-core's delayed-wgrad hook; weights grads are not delayed here
        pass


def sequential_reference(num_local_experts: int, config: TransformerConfig, pg_collection):
    """megatron-core's SequentialMLP with the same experts (what `moe.expert_impl: sequential`
    builds): the reference GroupedExperts is checked and benchmarked against."""
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.mlp import MLPSubmodules
    from megatron.core.transformer.moe.experts import SequentialMLP

    submodules = MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear)
    return SequentialMLP(num_local_experts, config, submodules, pg_collection=pg_collection)
