"""Head-wise routing (MH-MoE; docs/methods.md section 2, arXiv 2602.12587) inside megatron-core's MoE layer.

The MoE input h [s, b, d] splits into H slices of width d/H, the sub-tokens. They travel through
megatron-core's token dispatcher as tokens of their own: routing-map rows are sub-tokens in
(s, b, head) order and columns are the layer's global expert ids, so expert parallelism, the
all-to-all and the grouped-GEMM experts are the ones every other variant uses.

headwise.bank=per_head: head j has its own router (rows j*E_h ... of one [H*E_h, d/H] weight) and
its own bank of E_h experts (global ids j*E_h + e), each d/H -> ffn -> d; the layer's output is the
sum over heads. With H = 1 this is the flat MoE, operation for operation.
headwise.bank=shared (Wu et al., arXiv 2404.15045): a d x d mixing projection first, one router and
one bank of E_h experts (d/H -> ffn -> d/H) for every head's sub-tokens, then the heads' outputs
concatenated and merged by a d x d projection.

Load balancing is per router bank: each head's aux loss balances its own bank (per micro-batch or
per sequence), and the layer's loss is the mean over heads; likewise the z-loss and the
auxiliary-loss-free expert bias.
"""
from __future__ import annotations

import dataclasses
import functools

import torch
import torch.nn.functional as F
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.moe.moe_utils import (
    compute_routing_scores_for_aux_loss,
    get_tokens_per_expert_and_token_count,
    router_gating_linear,
    switch_load_balancing_loss_func,
    topk_routing_with_score_function,
)
from megatron.core.transformer.moe.router import TopKRouter

from megatron_sdmoe.config import HeadwiseConfig
from megatron_sdmoe.moe.token_dropping import apply_router_token_dropping

# megatron-core's aux-loss types -> the names its metrics tracker logs them under
_BALANCING_LOSSES = {"aux_loss": "load_balancing_loss", "seq_aux_loss": "seq_load_balancing_loss"}


class HeadwiseRouter(TopKRouter):
    """`banks` routers in one module: one per head (banks = H) or one for all heads (banks = 1),
    each choosing top-k among its bank of `bank_size` experts. Routing reuses megatron-core's
    score functions, group-limited top-k, expert bias, token dropping and loss functions; only the
    layout (sub-token rows, per-bank columns) is this class's."""

    def __init__(self, config, pg_collection=None, is_mtp_layer: bool = False, *, heads: int, banks: int):
        super().__init__(config=config, pg_collection=pg_collection, is_mtp_layer=is_mtp_layer)
        self.heads, self.banks = heads, banks
        self.bank_size = config.num_moe_experts // banks
        weight = torch.empty(config.num_moe_experts, config.hidden_size // heads, dtype=self.weight.dtype,
                             device=self.weight.device)
        self.weight = torch.nn.Parameter(weight)
        self.weight.sequence_parallel = config.sequence_parallel  # as megatron-core's router weight
        if self.enable_expert_bias:  # per bank, so megatron-core's bias update balances each bank on its own
            self.local_tokens_per_expert = self.local_tokens_per_expert.view(banks, self.bank_size)
            self.expert_bias = self.expert_bias.view(banks, self.bank_size)

    def gating(self, input: torch.Tensor) -> torch.Tensor:
        """[s, b, d] -> logits [s, b x (H / banks), banks x bank_size]: a row per token (per-head
        banks) or per sub-token (one bank), a column block per bank."""
        s, b, d = input.shape
        if self.banks == 1:  # one router for every head's slice
            weight, input = self.weight, input.reshape(s, b * self.heads, d // self.heads)
        else:  # block-diagonal: a head's logits come from its own slice and its own router
            weight = torch.block_diag(*self.weight.view(self.heads, self.bank_size, -1))
        dtype = {"fp32": torch.float32, "fp64": torch.float64}.get(self.config.moe_router_dtype, input.dtype)
        return router_gating_linear(input, weight, None, dtype)

    def routing(self, logits: torch.Tensor, padding_mask: torch.Tensor | None = None):
        """Top-k within each sub-token's bank. Returns probs and map [s*b*H, experts]: rows are
        sub-tokens in (s, b, head) order, columns the layer's global expert ids."""
        assert padding_mask is None, "head-wise routing takes no padding mask"
        s = logits.shape[0]
        logits = logits.reshape(-1, self.bank_size)  # a row per sub-token: its bank's logits
        rows = logits.shape[0]
        b = rows // (s * self.heads)
        logits = self.apply_z_loss(logits)  # the mean over sub-tokens: over heads, each head's mean
        bias = None if self.expert_bias is None else self.expert_bias.repeat(rows // self.banks, 1)
        probs, experts = topk_routing_with_score_function(
            logits, self.topk, use_pre_softmax=self.config.moe_router_pre_softmax,
            num_groups=self.config.moe_router_num_groups, group_topk=self.config.moe_router_group_topk,
            scaling_factor=self.config.moe_router_topk_scaling_factor, score_function=self.score_function,
            expert_bias=bias, fused=self.config.moe_router_fusion, router_replay=self.router_replay,
            dense_output=True)
        if self.banks > 1:  # bank-local ids -> the layer's: head j's experts start at j * bank_size
            heads = torch.arange(rows, device=experts.device) % self.heads
            experts = experts + (heads * self.bank_size).unsqueeze(1)
        shape = (rows, self.config.num_moe_experts)
        routing_probs = logits.new_zeros(shape).scatter(1, experts, probs)
        routing_map = torch.zeros(shape, dtype=torch.bool, device=logits.device).scatter(1, experts, True)
        if self.config.moe_expert_capacity_factor is not None:  # capacity per expert: its bank's tokens
            routing_probs, routing_map = apply_router_token_dropping(
                routing_probs, routing_map, router_topk=self.topk,
                capacity_factor=self.config.moe_expert_capacity_factor, drop_policy=self.config.moe_token_drop_policy,
                pad_to_capacity=self.config.moe_pad_expert_input_to_capacity)
        if self.training and torch.is_grad_enabled() and self.is_aux_loss_enabled():
            aux_map, scores = compute_routing_scores_for_aux_loss(logits, self.topk, self.score_function,
                                                                  fused=self.config.moe_router_fusion)
            routing_probs = self._apply_balancing_losses(routing_probs, scores, aux_map, s, b)
        if self.enable_expert_bias and torch.is_grad_enabled():
            with torch.no_grad():
                self.local_tokens_per_expert += routing_map.sum(0).view_as(self.local_tokens_per_expert)
        return routing_probs, routing_map

    def _apply_balancing_losses(self, probs, scores, routing_map, s: int, b: int) -> torch.Tensor:
        """megatron-core's switch load-balancing loss for each balancing group on its own (a bank
        over the micro-batch, or over one sequence), averaged over the groups. Laid out as
        [tokens of a group, groups x bank] one call sums the groups' losses: the trick
        megatron-core's sequence-level loss uses for sequences."""
        for loss_type, name in _BALANCING_LOSSES.items():
            coeff = self.get_aux_loss_coeff(loss_type)
            if coeff == 0:
                continue
            per_sequence = loss_type == "seq_aux_loss"
            groups = self.banks * (b if per_sequence else 1)
            grouped_scores, grouped_map = (self._by_group(t, s, b, per_sequence) for t in (scores, routing_map))
            tokens_per_expert, local_tokens, total_tokens = get_tokens_per_expert_and_token_count(
                grouped_map, self.tp_cp_group, topk=self.topk * groups)
            loss = switch_load_balancing_loss_func(grouped_scores, tokens_per_expert, total_tokens, self.topk,
                                                   self.bank_size, coeff, fused=self.config.moe_router_fusion) / groups
            probs = self.attach_and_log_load_balancing_loss(probs, coeff, loss, name, self.tp_cp_group,
                                                            valid_token_count=local_tokens * groups)
        return probs

    def _by_group(self, t: torch.Tensor, s: int, b: int, per_sequence: bool) -> torch.Tensor:
        """[s*b*H, bank] (rows in (s, b, head) order) -> [tokens of a group, groups x bank]."""
        t = t.reshape(s, b, self.heads, self.bank_size)
        if self.banks > 1:  # a group per head (x sequence)
            return t.reshape(s, -1) if per_sequence else t.reshape(s * b, -1)
        # one bank: a group is the micro-batch (every sub-token), or one sequence (its s x H sub-tokens)
        return t.transpose(1, 2).reshape(s * self.heads, -1) if per_sequence else t.reshape(-1, self.bank_size)


class HeadwiseMoELayer(MoELayer):
    """megatron-core's MoE layer on sub-tokens: the router above, experts that read d/H wide
    inputs, and the dispatcher's own permute / all-to-all / combine."""

    def __init__(self, config, submodules=None, layer_number=None, pg_collection=None, is_mtp_layer: bool = False,
                 name=None, *, headwise: HeadwiseConfig):
        self.heads, self.shared_bank = headwise.heads, headwise.bank == "shared"
        d = config.hidden_size
        submodules = dataclasses.replace(
            submodules, router=functools.partial(HeadwiseRouter, heads=self.heads, banks=1 if self.shared_bank else self.heads),
            experts=functools.partial(submodules.experts, input_size=d // self.heads,
                                      output_size=d // self.heads if self.shared_bank else d))
        super().__init__(config, submodules, layer_number, pg_collection, is_mtp_layer, name)
        if self.shared_bank:  # replicated over TP like the router; weights drawn by models/init.py
            self.mix_proj, self.merge_proj = (self._dense(d) for _ in range(2))
        self._moe_input: torch.Tensor | None = None

    def _dense(self, d: int) -> torch.nn.Parameter:
        device = "cpu" if self.config.use_cpu_initialization else torch.cuda.current_device()
        param = torch.nn.Parameter(torch.empty(d, d, dtype=self.config.params_dtype, device=device))
        param.sequence_parallel = self.config.sequence_parallel  # each TP rank sees its part of the sequence
        return param

    def route(self, hidden_states: torch.Tensor, padding_mask=None):
        if self.shared_bank:
            hidden_states = F.linear(hidden_states, self.mix_proj)
        self._moe_input = hidden_states
        return super().route(hidden_states, padding_mask)

    def preprocess(self, hidden_states: torch.Tensor, probs: torch.Tensor, routing_map: torch.Tensor):
        moe_input, self._moe_input = self._moe_input, None
        self._input_shape = moe_input.shape
        sub_tokens = moe_input.reshape(-1, moe_input.shape[-1] // self.heads)
        hidden_states, probs = super().preprocess(sub_tokens, probs, routing_map)
        if not self.shared_bank:
            # megatron-core's dispatcher restores the width it dispatched; per-head experts write d.
            dispatcher = self.token_dispatcher
            dispatcher.hidden_shape = dispatcher.hidden_shape_before_permute = torch.Size(
                (sub_tokens.shape[0], moe_input.shape[-1]))
        return hidden_states, probs

    def postprocess(self, output: torch.Tensor, shared_expert_output: torch.Tensor | None):
        output = self.token_dispatcher.combine_postprocess(output)  # [s*b*H, d] (per head) or [s*b*H, d/H]
        s, b, d = self._input_shape
        if self.shared_bank:  # concatenate the heads, merge
            output = F.linear(output.reshape(s, b, d), self.merge_proj)
        else:  # sum over heads
            output = output.view(s, b, self.heads, d).sum(2)
        return output if shared_expert_output is None else output + shared_expert_output
