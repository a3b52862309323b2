"""`sdmoe-estimate CONFIG`: parameters (total, active), training FLOPs per token and memory per GPU
of a config's model under its parallel layout, with a verdict whether it fits.

    sdmoe-estimate configs/qwen3-30b-a3b.yaml --gpus 32
    sdmoe-estimate configs/deepseek-v3.yaml --gpus 1024 --json train.recompute=full

Parameters are counted from the config the way models/ builds them (tests check the count against
the built model for every tiny config). FLOPs per token are the training matmul FLOPs (3 x forward:
2 per weight use, plus causal attention scores); the training metrics' TFLOP/s and MFU use the
same number. Head-wise routing (moe.variant: headwise*) is counted per sub-token: each of a
token's H slices (d/H wide) goes to experts of its own. Memory is a model of this code base under
DeepSpeed ZeRO-1/2 (see `memory`), not a measurement.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass

from megatron_sdmoe.config import (Config, expert_ffn_hidden_size, expert_input_size, is_headwise, is_sdmoe,
                                   load_config, recompute_label, routed_experts, routed_topk, router_bank_size,
                                   sdmoe_group_size)
from megatron_sdmoe.errors import ArgumentParser, UserError, exit_bad_input, positive_number
from megatron_sdmoe.validation import validate

GIB = 2**30
# Dense bf16 / fp32 peak TFLOP/s (vendor datasheets) by device-name fragment, first match wins.
PEAK_TFLOPS = {"H100 PCIe": (756.0, 51.0), "H100 NVL": (835.0, 60.0), "H100": (989.4, 66.9),
               "H200": (989.4, 66.9), "A100": (312.0, 19.5)}  # H200 matches GH200 too
# DeepSpeed's default reduce and all-gather bucket sizes (elements), which this project keeps.
DEEPSPEED_BUCKET_ELEMENTS = 2 * 500_000_000


@dataclass
class Block:
    """A group of parameters with one sharding and one activation pattern."""

    name: str
    params: int
    shards: int  # ranks it is split over: TP (dense), EP x ETP (routed experts), 1 (replicated)
    # uses per token and weight: a fraction for routed experts (topk / experts); above 1 where a
    # token's sub-tokens each use the weight (head-wise routing's shared bank)
    active: float = 1.0
    matmul: bool = True  # costs 2 FLOPs per weight per use (not embedding lookups or norms)
    expert: bool = False  # its optimizer states are partitioned over expert-DP, not DP

    @property
    def active_params(self) -> float:
        """Parameters a token uses; a weight several of its sub-tokens use counts once."""
        return self.params * min(self.active, 1.0)


def vocab_size(cfg: Config) -> int:
    """The embedding's rows before padding: model.vocab_size, else the tokenizer's."""
    if cfg.model.vocab_size:
        return cfg.model.vocab_size
    from megatron_sdmoe.data.sample_corpus import configured_tokenizer

    return configured_tokenizer(cfg.data.tokenizer).vocab_size


def head_dims(cfg: Config) -> tuple[int, int]:
    """Per-head query/key and value widths."""
    m = cfg.model
    if m.attention == "mla":
        return m.mla.qk_head_dim + m.mla.qk_rope_head_dim, m.mla.v_head_dim
    d = m.kv_channels or m.hidden_size // m.num_attention_heads
    return d, d


def attention_parameters(cfg: Config, family: dict) -> tuple[int, int, int]:
    """Per layer: projection weights, QKV bias, and norm weights (QK-norms, MLA's latent norms)."""
    m, h, heads = cfg.model, cfg.model.hidden_size, cfg.model.num_attention_heads
    (qk, v), out = head_dims(cfg), heads * head_dims(cfg)[1] * h
    if m.attention == "mla":
        mla = m.mla
        query = (h * mla.q_lora_rank + mla.q_lora_rank * heads * qk) if mla.q_lora_rank else h * heads * qk
        key_value = h * (mla.kv_lora_rank + mla.qk_rope_head_dim) + mla.kv_lora_rank * heads * (mla.qk_head_dim + v)
        return query + key_value + out, 0, (mla.q_lora_rank or 0) + mla.kv_lora_rank
    qkv_width = (heads + 2 * m.num_query_groups) * qk
    return h * qkv_width + out, qkv_width * family["add_qkv_bias"], 2 * qk * family["qk_layernorm"]


def shared_bank(cfg: Config) -> bool:
    """Head-wise routing with one expert bank for all heads (headwise.bank=shared)."""
    return is_headwise(cfg) and cfg.headwise.bank == "shared"


def sub_tokens(cfg: Config) -> int:
    """Parts of a token routed on their own: its H head slices under head-wise routing."""
    return cfg.headwise.heads if is_headwise(cfg) else 1


def expert_output_size(cfg: Config) -> int:
    """Width a routed expert writes: the hidden size, or one head's slice with the shared bank."""
    return expert_input_size(cfg) if shared_bank(cfg) else cfg.model.hidden_size


def expert_parameters(cfg: Config) -> int:
    """One routed expert (SwiGLU): gate and up (f x d_in each), down (d_out x f)."""
    return expert_ffn_hidden_size(cfg) * (2 * expert_input_size(cfg) + expert_output_size(cfg))


def routed_active(cfg: Config) -> float:
    """Uses per token of a layer's routed-expert weights: every sub-token goes to top-k experts."""
    return sub_tokens(cfg) * routed_topk(cfg) / routed_experts(cfg)


def parameter_blocks(cfg: Config, vocab: int) -> list[Block]:
    from megatron_sdmoe.models import PRESETS, padded_vocab_size

    m, moe, par = cfg.model, cfg.moe, cfg.parallel
    family = PRESETS[m.preset].transformer_kwargs(cfg)
    h, tp, experts = m.hidden_size, par.tensor, routed_experts(cfg)
    attention, qkv_bias, attention_norms = attention_parameters(cfg, family)
    layers = m.num_layers + m.mtp_layers  # an MTP depth is one more MoE transformer layer
    moe_layers = layers - m.dense_layers
    swiglu = 3 * h  # gate, up (h x f each) and down (f x h) per unit of FFN width
    routed = expert_parameters(cfg) * experts * moe_layers
    blocks = [
        Block("embedding", padded_vocab_size(vocab, cfg) * h, tp, matmul=False),
        Block("attention", layers * attention, tp),
        Block("attention QKV bias", layers * qkv_bias, tp, matmul=False),
        # per layer: input and pre-MLP norms (+ attention's); the final norm; per MTP depth: 3 more
        Block("norms", layers * (2 * h + attention_norms) + h + m.mtp_layers * 3 * h, 1, matmul=False),
        Block("dense MLPs", m.dense_layers * swiglu * m.dense_ffn_hidden_size, tp),
        # a router row per expert, d_in wide; every sub-token is scored against its bank
        Block("routers", moe_layers * experts * expert_input_size(cfg), 1,
              sub_tokens(cfg) * router_bank_size(cfg) / experts),
        Block("routed experts", routed, par.expert * par.expert_tensor, routed_active(cfg), expert=True),
        Block("head mixing and merge", moe_layers * 2 * h * h * shared_bank(cfg), 1),  # d x d each, replicated
        Block("shared experts", moe_layers * swiglu * moe.shared_expert_ffn_hidden_size, tp),
        Block("shared-expert gates", moe_layers * h * bool(family.get("moe_shared_expert_gate")), 1),
        Block("MTP projections", m.mtp_layers * 2 * h * h, 1),
    ]
    if is_sdmoe(cfg):  # C: one per group of experts (shared) or per expert, whatever sdmoe.rank
        if cfg.sdmoe.common == "shared":
            groups = experts // sdmoe_group_size(cfg)
            blocks.append(Block("SD-MoE common parts", expert_parameters(cfg) * groups * moe_layers, 1,
                                matmul=False))
        else:
            blocks.append(Block("SD-MoE common parts", routed, par.expert * par.expert_tensor, matmul=False,
                                expert=True))
    blocks.append(Block("output layer", padded_vocab_size(vocab, cfg) * h, tp))  # untied, in every family
    return [b for b in blocks if b.params]


def flops_per_token(cfg: Config, vocab: int) -> float:
    """Training FLOPs per token: 3 x (2 per matmul weight use + causal attention scores).
    SD-MoE's common parts cost no extra GEMMs: the experts multiply by C + U_e once."""
    from megatron_sdmoe.models import padded_vocab_size

    m = cfg.model
    forward = sum(2 * b.params * b.active for b in parameter_blocks(cfg, vocab) if b.matmul)
    forward += 2 * m.mtp_layers * padded_vocab_size(vocab, cfg) * m.hidden_size  # MTP reuses the output layer
    qk, v = head_dims(cfg)
    # QK^T and AV: 2 x (mean causal context s/2) x heads x (query/key + value head dims), per layer
    forward += (m.num_layers + m.mtp_layers) * cfg.data.seq_length * m.num_attention_heads * (qk + v)
    return 3 * forward


def activation_bytes(cfg: Config, vocab: int, dtype_bytes: int) -> float:
    """Peak saved activations of one micro-batch on one rank: what the forward keeps for backward,
    plus what the largest recomputed unit holds again while backward passes through it."""
    kept, recomputed = saved_activation_bytes(cfg, vocab, dtype_bytes)
    return kept + recomputed


def saved_activation_bytes(cfg: Config, vocab: int, dtype_bytes: int) -> tuple[float, float]:
    """(what the forward keeps for backward, summed over layers; what the largest recomputed unit
    saves again while backward passes through it), in bytes.

    Sequence parallelism splits every token-dimension tensor over TP; tensor parallelism splits
    heads and FFN widths. The fused attention kernel keeps no [heads, s, s] matrix (on GPUs).
    Routed tokens are counted at an even load (the capacity factor bounds the busiest rank).
    Head-wise routing dispatches sub-tokens: H per token, d/H wide. SD-MoE keeps each layer's
    effective expert weights for the step. Recomputation (train.recompute, megatron-core's) keeps
    a recomputed part's input only: `full` a layer's input (an MTP layer's two), `selective` drops
    what its modules save: `moe` the MoE layer's insides (routing, dispatch, experts, shared
    experts), `shared_experts` and `mlp` (dense layers) their SwiGLUs'.
    """
    from megatron_sdmoe.models import padded_vocab_size

    m, moe, tr = cfg.model, cfg.moe, cfg.train
    s, b, h, t = cfg.data.seq_length, tr.micro_batch_size, m.hidden_size, cfg.parallel.tensor
    (qk, v), heads = head_dims(cfg), m.num_attention_heads
    kv_heads = heads if m.attention == "mla" else m.num_query_groups
    tokens = s * b / t
    selective = set(tr.recompute_modules) if tr.recompute == "selective" else set()
    swiglu_saved = 5  # fc1 output (2f), silu(gate), silu(gate) * up, its probability-weighted copy
    sub, dispatched = tokens * sub_tokens(cfg), tokens * sub_tokens(cfg) * routed_topk(cfg)
    query_key_value = tokens * (heads * qk + kv_heads * (qk + v))  # after RoPE
    attention = tokens * (3 * h + heads * v) + query_key_value  # norm in/out, residual, attention output
    routed = (sub * router_bank_size(cfg) * 2  # router scores (fp32)
              + dispatched * (expert_input_size(cfg) + expert_output_size(cfg))  # expert inputs, outputs
              + dispatched * swiglu_saved * expert_ffn_hidden_size(cfg)
              + tokens * 2 * h * shared_bank(cfg))  # the shared bank's mixed input and concatenated heads
    # SD-MoE: every MoE layer keeps its effective weights W = C + U (this rank's experts) for the
    # whole step, recomputed or not: the step's micro-batches share them
    local_experts = routed_experts(cfg) / (cfg.parallel.expert * cfg.parallel.expert_tensor)
    effective_weights = expert_parameters(cfg) * local_experts if is_sdmoe(cfg) else 0
    shared = tokens * swiglu_saved * moe.shared_expert_ffn_hidden_size
    # each layer's parts: (elements they save, whether they are recomputed); the attention and the
    # MLP's norm (input and output) are never recomputed on their own
    always = attention + tokens * 2 * h
    moe_layer = [(always + effective_weights, False)]
    moe_layer += ([(routed + shared, True)] if "moe" in selective  # the MoE layer is one unit
                  else [(routed, False), (shared, "shared_experts" in selective)])
    dense_layer = [(always, False), (tokens * swiglu_saved * m.dense_ffn_hidden_size, "mlp" in selective)]
    # in order, with what each keeps when recomputed whole: dense first layers, MoE layers, MTP
    # layers (two inputs: hidden state and embedding)
    layers = ([(dense_layer, tokens * h)] * m.dense_layers
              + [(moe_layer, tokens * h + effective_weights)] * (m.num_layers - m.dense_layers)
              + [(moe_layer, 2 * tokens * h + effective_weights)] * m.mtp_layers)
    whole_layers = (tr.recompute_layers or len(layers)) if tr.recompute == "full" else 0  # the first ones
    kept = recomputed = 0.0
    for index, (parts, kept_when_whole) in enumerate(layers):
        if index < whole_layers:  # keeps its input; runs again as a whole in backward
            kept, recomputed = kept + kept_when_whole, max(recomputed, sum(n for n, _ in parts))
        else:
            kept += sum(n for n, again in parts if not again)
            recomputed = max([recomputed] + [n for n, again in parts if again])
    heads_out = 1 + m.mtp_layers  # output heads: the final norm (input and output), logits
    kept += heads_out * tokens * 2 * h
    logits = heads_out * tokens * padded_vocab_size(vocab, cfg) * (dtype_bytes + (4 if dtype_bytes < 4 else 0))
    return kept * dtype_bytes + logits, recomputed * dtype_bytes  # (logits in bf16 have an fp32 copy)


@dataclass
class Estimate:
    params_total: int
    params_active: int  # used per token, embedding and output layer included (Qwen's convention)
    params_active_without_embedding: int  # the same without the input embedding (DeepSeek's convention)
    flops_per_token: float
    gpus: int
    weights_gib: float
    grads_gib: float
    optimizer_gib: float
    buffers_gib: float  # DeepSpeed's communication buckets
    activations_gib: float
    recompute: str  # train.recompute, with its layers or modules
    total_gib: float
    gpu_memory_gib: float
    fits: bool

    def report(self, blocks: list[Block]) -> str:
        rows = [f"  {b.name:<28}{_count(b.params):>10}" for b in blocks]
        verdict = (f"fits: {self.total_gib:.1f} of {self.gpu_memory_gib:.0f} GiB per GPU (limit 90%)" if self.fits
                   else f"DOES NOT FIT: {self.total_gib:.1f} GiB per GPU exceeds 90% of {self.gpu_memory_gib:.0f} GiB; "
                        "raise parallel.expert / parallel.tensor, use parallel.zero_stage=2, train.recompute, more GPUs "
                        "or a smaller train.micro_batch_size")
        return "\n".join([
            "parameters:", *rows,
            f"  {'total':<28}{_count(self.params_total):>10}",
            f"  {'active per token':<28}{_count(self.params_active):>10}",
            f"  {'  without the embedding':<28}{_count(self.params_active_without_embedding):>10}",
            f"training FLOPs per token: {self.flops_per_token / 1e9:.4g} GFLOP",
            f"memory per GPU ({self.gpus} GPUs):",
            f"  weights {self.weights_gib:.1f} GiB | grads {self.grads_gib:.1f} GiB | optimizer {self.optimizer_gib:.1f} "
            f"GiB | buffers {self.buffers_gib:.1f} GiB | activations {self.activations_gib:.1f} GiB "
            f"(recompute: {self.recompute})",
            verdict])


def _count(n: float) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def estimate(cfg: Config, gpus: int, gpu_memory_gib: float = 80.0, vocab: int | None = None,
             precision: str = "bf16") -> tuple[Estimate, list[Block]]:
    """Memory per GPU under ZeRO-1/2 with AdamW (DeepSpeed keeps fp32 master weights and both Adam
    moments, partitioned over DP for dense and over expert-DP for expert parameters; gradients
    accumulate in fp32, whole under ZeRO-1, partitioned under ZeRO-2)."""
    vocab = vocab or vocab_size(cfg)
    par = cfg.parallel
    blocks = parameter_blocks(cfg, vocab)
    dtype_bytes = 2 if precision == "bf16" else 4
    dp, expert_dp = gpus // par.tensor, gpus // (par.expert * par.expert_tensor)
    local = sum(b.params / b.shards for b in blocks)
    partitioned = sum(b.params / b.shards / (expert_dp if b.expert else dp) for b in blocks)  # ZeRO's share
    total = sum(b.params for b in blocks)
    weights = local * dtype_bytes
    # Gradients accumulate in fp32 (training/engine.py): under ZeRO-1 whole, and in bf16 beside the
    # bf16 gradients autograd writes (DeepSpeed's BF16_Optimizer keeps both); under ZeRO-2 partitioned.
    autograd_bytes = dtype_bytes if dtype_bytes < 4 else 0
    grads = local * (4 + autograd_bytes) if par.zero_stage == 1 else partitioned * 4
    optimizer = partitioned * 12  # fp32 master + Adam m + v
    buffers = min(DEEPSPEED_BUCKET_ELEMENTS, local) * dtype_bytes
    activations = activation_bytes(cfg, vocab, dtype_bytes)
    used = (weights + grads + optimizer + buffers + activations) / GIB
    result = Estimate(
        params_total=total,
        params_active=round(sum(b.active_params for b in blocks)),
        params_active_without_embedding=round(sum(b.active_params for b in blocks if b.name != "embedding")),
        flops_per_token=flops_per_token(cfg, vocab), gpus=gpus,
        weights_gib=weights / GIB, grads_gib=grads / GIB, optimizer_gib=optimizer / GIB, buffers_gib=buffers / GIB,
        activations_gib=activations / GIB, recompute=recompute_label(cfg), total_gib=used, gpu_memory_gib=gpu_memory_gib,
        fits=used <= 0.9 * gpu_memory_gib)
    return result, blocks


def peak_tflops(device_name: str, bf16: bool) -> float | None:
    """The device's dense peak, or None when it is not in the table (MFU is then not reported)."""
    for fragment, (bf16_peak, fp32_peak) in PEAK_TFLOPS.items():
        if fragment in device_name:
            return bf16_peak if bf16 else fp32_peak
    return None


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(prog="sdmoe-estimate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="YAML config file (see configs/)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    parser.add_argument("--gpus", type=int, help="GPUs in the job (default: the fewest the parallel layout needs)")
    parser.add_argument("--gpu-memory-gib", type=positive_number, default=80.0, help="memory of one GPU (default 80)")
    parser.add_argument("--json", action="store_true", help="print the estimate as JSON")
    args = parser.parse_intermixed_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        par = cfg.parallel
        gpus = math.lcm(par.tensor, par.expert * par.expert_tensor) if args.gpus is None else args.gpus
        if gpus < 1:
            raise UserError(f"--gpus={gpus} must be at least 1")
        try:
            validate(cfg, gpus)
        except UserError as e:  # validate speaks of the processes of a launch: these are --gpus
            given = "" if args.gpus else " (the default: the fewest the layout needs)"
            raise UserError(f"with --gpus {gpus}{given}: {e}") from e
        result, blocks = estimate(cfg, gpus, args.gpu_memory_gib)
    except UserError as e:
        exit_bad_input(e)
    print(json.dumps(asdict(result), indent=2) if args.json else result.report(blocks))
    sys.exit(0 if result.fits else 1)


if __name__ == "__main__":
    main()
