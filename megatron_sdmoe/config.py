"""Typed configuration: dataclasses, YAML loading, dotted `key=value` overrides, validation.

One `Config` object flows from the command line to every component. Loading checks keys and
types; `validate(cfg, world_size)` checks the values against each other and the parallel layout.
Every problem raises `UserError` with one line that names the key and the fix.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from megatron_sdmoe.errors import UserError


@dataclass
class RunConfig:
    dir: str = "runs/default"  # run directory; starting again in it resumes from checkpoints/latest


@dataclass
class MLAConfig:
    """Multi-head latent attention (model.attention: mla), DeepSeek-V2/V3's."""

    q_lora_rank: Optional[int] = None  # query latent width; empty: a full query projection (V2-Lite)
    kv_lora_rank: int = 512  # key/value latent width
    qk_head_dim: int = 128  # per-head query/key width without RoPE
    qk_rope_head_dim: int = 64  # per-head query/key width with RoPE (the key's part is shared by all heads)
    v_head_dim: int = 128  # per-head value width


@dataclass
class ModelConfig:
    preset: str = "qwen3_moe"  # model family (models/)
    num_layers: int = 2
    hidden_size: int = 64
    num_attention_heads: int = 4
    num_query_groups: int = 2  # GQA key/value heads
    attention: str = "gqa"  # gqa | mla (multi-head latent attention, the deepseek preset; see model.mla)
    mla: MLAConfig = field(default_factory=MLAConfig)
    kv_channels: Optional[int] = None  # head dim; default hidden_size / num_attention_heads
    max_position_embeddings: int = 4096
    rotary_base: int = 1000000
    norm_epsilon: float = 1e-6
    init_method_std: float = 0.02
    vocab_size: Optional[int] = None  # embedding rows (before padding); empty: the tokenizer's size
    make_vocab_size_divisible_by: int = 128  # vocab padded to a multiple of this (layout-independent)
    dense_layers: int = 0  # the first k layers have a dense MLP instead of experts (DeepSeek's first_k_dense)
    dense_ffn_hidden_size: int = 0  # FFN width of those dense layers (required when dense_layers > 0)
    mtp_layers: int = 0  # multi-token prediction depth (DeepSeek-V3: 1); 0: off
    mtp_loss_coeff: float = 0.1  # weight of the mean MTP loss
    # start from these weights instead of a random draw: a directory of whole tensors in this
    # system's names (`sdmoe-convert from-hf` writes one); tensors it lacks are drawn as usual
    init_from: Optional[str] = None


@dataclass
class MoEConfig:
    variant: str = "topk"  # topk | sdmoe | headwise | headwise_sdmoe (head-wise routing with SD-MoE experts)
    expert_impl: str = "grouped"  # grouped (torch._grouped_mm) | sequential (megatron-core's SequentialMLP)
    num_experts: int = 8  # routed experts per layer (head-wise variants: see the headwise section)
    topk: int = 2  # experts each token picks (head-wise variants: headwise.topk per head)
    ffn_hidden_size: int = 128  # per expert
    shared_expert_ffn_hidden_size: int = 0  # shared expert(s) FFN width, 0: none (qwen2_moe needs one)
    score_function: Optional[str] = None  # softmax | sigmoid; empty: the family's (qwen: softmax, deepseek: sigmoid)
    aux_loss_coeff: float = 0.01  # load-balancing loss weight
    aux_loss_type: str = "batch"  # batch (per micro-batch) | sequence (per sequence, DeepSeek-V3)
    z_loss_coeff: float = 0.0  # router logit z-loss weight
    expert_bias_update_rate: float = 0.0  # > 0: auxiliary-loss-free balancing by a routing bias (DeepSeek-V3)
    num_groups: int = 0  # group-limited routing: experts in this many groups (0: off) ...
    group_topk: int = 0  # ... and each token picks its experts within this many groups
    routed_scaling_factor: float = 1.0  # routed experts' output scale (DeepSeek-V3: 2.5)
    capacity_factor: Optional[float] = None  # tokens an expert takes, relative to an even share; empty: dropless
    token_drop_policy: str = "probs"  # over capacity, drop the lowest-probability (probs) or latest (position)
    router_dtype: str = "fp32"  # fp32 | fp64 | none (the model dtype)
    diag_interval: int = 0  # steps between specialisation diagnostics (0: off); see methods.md section 3
    diag_rank: int = 8  # k of the singular subspaces the diagnostics compare
    diag_position_buckets: int = 1  # route composition labels: source dataset x this many position buckets


@dataclass
class SDMoEConfig:
    """Spectral-decoupled experts (moe.variant: sdmoe); see docs/sdmoe.md."""

    rank: int = 8  # k: rank of the common basis; 0 reduces SD-MoE to the baseline exactly
    refresh_interval: int = 16  # T: optimizer steps between basis refreshes
    projections: list = field(default_factory=lambda: ["gate", "up", "down"])  # which are decoupled
    common: str = "shared"  # shared (one C per layer) | per_expert (C_e and basis per expert)
    common_lr_scale: float = 1.0  # LR of the common matrices relative to train.lr
    project_updates: bool = False  # keep each step's change of U_e in the complement (exact under Adam)
    power_iterations: int = 2  # randomized SVD
    oversample: int = 8  # randomized SVD


@dataclass
class HeadwiseConfig:
    """Head-wise routing (moe.variant: headwise or headwise_sdmoe); see docs/headwise.md."""

    heads: int = 4  # H: the MoE input splits into H slices of model.hidden_size / H
    experts_per_head: int = 4  # experts each head routes among
    topk: int = 1  # experts each head picks
    ffn_hidden_size: int = 0  # each expert's FFN width; 0: moe.ffn_hidden_size
    # per_head: a router and an expert bank per head, experts map d/H -> d, heads summed (MH-MoE,
    # arXiv 2602.12587). shared: Wu et al. (arXiv 2404.15045): a d x d mixing projection, one bank
    # of experts (d/H -> d/H) shared by all heads, the heads concatenated and a d x d merge projection.
    bank: str = "per_head"


@dataclass
class SmoothingConfig:
    """Parametric singularity smoothing (methods.md section 5, arXiv 2602.01308); see docs/smoothing.md."""

    enabled: bool = False  # on a gradient-norm spike, clip every weight matrix's top singular values
    threshold: float = 2.5  # tau: a spike is a global gradient norm above tau x its running mean
    ema_decay: float = 0.99  # the running mean: an EMA over the steps that were not spikes (our choice)


@dataclass
class ParallelConfig:
    tensor: int = 1
    expert: int = 1
    expert_tensor: int = 1
    zero_stage: int = 1  # DeepSpeed ZeRO stage: 1 or 2


@dataclass
class TrainConfig:
    seed: int = 1234
    max_steps: int = 100
    global_batch_size: int = 16  # sequences per optimizer step, whatever the layout
    micro_batch_size: int = 4  # sequences per forward pass on one data-parallel rank
    lr: float = 3e-3
    lr_schedule: str = "cosine"  # after warmup: cosine decay | wsd (constant, then linear decay) | constant
    min_lr_ratio: float = 0.1  # cosine and wsd decay to lr * min_lr_ratio at max_steps
    warmup_steps: int = 10
    decay_fraction: float = 0.2  # wsd: the last fraction of max_steps decays
    weight_decay: float = 0.1
    adam_betas: list = field(default_factory=lambda: [0.9, 0.95])
    adam_eps: float = 1e-8
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    # Activation recomputation (megatron-core's): none | full (whole layers keep only their input
    # and run again in backward) | selective (only recompute_modules run again)
    recompute: str = "none"
    recompute_layers: int = 0  # full: the first N transformer layers only (0: every layer, MTP included)
    recompute_modules: list = field(default_factory=lambda: ["moe"])  # selective: see RECOMPUTE_MODULES
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16
    log_interval: int = 1
    eval_interval: int = 50  # 0 disables evaluation
    eval_samples: int = 32  # validation sequences per evaluation
    save_interval: int = 50  # 0 saves only at the end
    final_checkpoint: bool = True  # false: none at max_steps (benchmarks; stops and exit_interval still save)
    exit_interval: int = 0  # save and exit when the step count is a multiple of this (0: never)
    keep_checkpoints: int = 0  # keep the newest N checkpoints (0: all)
    max_skipped_steps: int = 10  # stop after this many steps in a row skipped for non-finite gradients (0: never)
    time_budget_minutes: float = 0.0  # save and exit (requeue code 3) before this wall-clock budget ends; 0: none
    peak_tflops: Optional[float] = None  # per-GPU dense peak for MFU; empty: known GPUs' datasheet value
    profile_steps: list = field(default_factory=list)  # [first, last]: torch.profiler trace of these steps (1-based)


@dataclass
class StageConfig:
    """One stage of continual training (methods.md section 4)."""

    path: list = field(default_factory=list)  # the stage's blend, as data.path
    valid_path: list = field(default_factory=list)  # its validation blend, as data.valid_path
    test_path: list = field(default_factory=list)  # its test blend, as data.test_path (the last stage's is evaluated)
    steps: int = 0  # optimizer steps on it
    name: Optional[str] = None  # label in the stage matrix; default stage_<i>


@dataclass
class DataConfig:
    # Blend of Megatron .bin/.idx prefixes: [prefix] or [weight, prefix, weight, prefix, ...].
    # Empty: the built-in sample corpus (built offline on first use).
    path: list = field(default_factory=list)
    tokenizer: Optional[str] = None  # Hugging Face tokenizer directory; required with data.path
    split: str = "98,2,0"  # train,validation,test weights over each prefix's documents
    valid_path: list = field(default_factory=list)  # a separate validation blend (then data.split is unused)
    test_path: list = field(default_factory=list)  # a separate test blend (needs data.valid_path)
    seq_length: int = 128
    cache_dir: Optional[str] = None  # megatron.core.datasets index cache; default <run.dir>/data_cache
    # Continual training: an ordered list of {path, steps, name} blends that replaces data.path;
    # after each stage every seen stage's validation data is evaluated (the stage matrix, BWT).
    stages: list[StageConfig] = field(default_factory=list)


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    sdmoe: SDMoEConfig = field(default_factory=SDMoEConfig)
    headwise: HeadwiseConfig = field(default_factory=HeadwiseConfig)
    smoothing: SmoothingConfig = field(default_factory=SmoothingConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)


# ---------------------------------------------------------------------------------------------
# Loading


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Config file (YAML) plus dotted `key=value` overrides -> typed Config."""
    raw: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"config file {path} not found: pass the path of a YAML file (see configs/)")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise UserError(f"config file {path} is not valid YAML ({_first_line(e)}): fix the syntax")
        if not isinstance(raw, dict):
            raise UserError(f"config file {path} must hold a mapping of sections (run:, model:, ...)")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"override {item!r} is not of the form dotted.key=value (e.g. train.lr=1e-3)")
        try:
            parsed = yaml.safe_load(value) if value != "" else ""
        except yaml.YAMLError:
            parsed = value
        _set_dotted(raw, key.split("."), parsed, item)
    return _build(Config, raw, "")


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: Path) -> None:
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def _set_dotted(tree: dict, keys: list[str], value: Any, item: str) -> None:
    node = tree
    for k in keys[:-1]:
        child = node.setdefault(k, {})
        if not isinstance(child, dict):
            raise UserError(f"override {item!r}: {k} is a value, not a section")
        node = child
    node[keys[-1]] = value


def _build(cls: type, raw: Any, prefix: str):
    if not isinstance(raw, dict):
        raise UserError(f"{prefix.rstrip('.') or 'config'} must be a mapping of keys, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in raw.items():
        if key not in fields:
            near = difflib.get_close_matches(key, fields, n=1)
            hint = f"; did you mean {prefix}{near[0]}?" if near else f"; known keys: {', '.join(fields)}"
            raise UserError(f"unknown config key {prefix}{key}{hint}")
        hint = hints[key]
        item_type = (typing.get_args(hint) or [None])[0] if typing.get_origin(hint) is list else None
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _build(hint, value, f"{prefix}{key}.")
        elif dataclasses.is_dataclass(item_type):  # a list of sections, e.g. data.stages
            if not isinstance(value, list):
                raise UserError(f"{prefix}{key} must be a list of mappings, got {value!r}")
            kwargs[key] = [_build(item_type, item, f"{prefix}{key}[{i}].") for i, item in enumerate(value)]
        else:
            kwargs[key] = _coerce(value, hint, f"{prefix}{key}")
    return cls(**kwargs)


def _coerce(value: Any, hint: Any, key: str) -> Any:
    optional = typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in typing.get_args(hint)
    base = next((a for a in typing.get_args(hint) if a is not type(None)), hint) if optional else hint
    if value is None:
        if optional:
            return None
        raise UserError(f"{key} may not be empty: give a {_type_name(base)}")
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if base is float and isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if base is list and not isinstance(value, list):
        value = [value]  # a single prefix is a blend of one
    if base is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, base) or (base is int and isinstance(value, bool)):
        raise UserError(f"{key} must be a {_type_name(base)}, got {value!r}")
    return value


def _type_name(t: Any) -> str:
    return {int: "whole number", float: "number", str: "string", bool: "boolean (true/false)",
            list: "list"}.get(t, getattr(t, "__name__", str(t)))


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


# ---------------------------------------------------------------------------------------------
# Validation


def validate(cfg: Config, world_size: int) -> None:
    """Check values against each other and the parallel layout of `world_size` processes."""
    m, moe, par, tr, data = cfg.model, cfg.moe, cfg.parallel, cfg.train, cfg.data

    def need(ok: bool, message: str) -> None:
        if not ok:
            raise UserError(message)

    from megatron_sdmoe.models import PRESETS

    need(m.preset in PRESETS, f"model.preset={m.preset!r} is unknown: use one of {', '.join(PRESETS)}")
    need(moe.variant in VARIANTS, f"moe.variant={moe.variant!r} is unknown: use one of {', '.join(VARIANTS)}")
    need(moe.expert_impl in ("grouped", "sequential"),
         f"moe.expert_impl={moe.expert_impl!r} is unknown: use grouped or sequential")
    if is_headwise(cfg):
        _validate_headwise(cfg, need)
    experts, topk, ffn, expert_input = routed_experts(cfg), routed_topk(cfg), expert_ffn_hidden_size(cfg), \
        expert_input_size(cfg)
    need(moe.shared_expert_ffn_hidden_size >= 0,
         f"moe.shared_expert_ffn_hidden_size={moe.shared_expert_ffn_hidden_size} must not be negative")
    need(m.preset != "qwen2_moe" or moe.shared_expert_ffn_hidden_size > 0,
         "model.preset=qwen2_moe has a shared expert: set moe.shared_expert_ffn_hidden_size (e.g. 4 x "
         "moe.ffn_hidden_size)")
    need(moe.shared_expert_ffn_hidden_size % par.tensor == 0,
         f"moe.shared_expert_ffn_hidden_size={moe.shared_expert_ffn_hidden_size} is not divisible by "
         f"parallel.tensor={par.tensor}")
    if moe.diag_interval:
        need(moe.diag_interval > 0, f"moe.diag_interval={moe.diag_interval} must not be negative")
        need(moe.expert_impl == "grouped" and par.expert_tensor == 1,
             "moe.diag_interval needs moe.expert_impl=grouped and parallel.expert_tensor=1")
        need(moe.diag_position_buckets >= 1,
             f"moe.diag_position_buckets={moe.diag_position_buckets} must be at least 1")
        need(1 <= moe.diag_rank <= min(expert_input, ffn),
             f"moe.diag_rank={moe.diag_rank} must lie in [1, {min(expert_input, ffn)}] (the experts' smaller side)")
    if is_sdmoe(cfg):
        sd = cfg.sdmoe
        need(moe.expert_impl == "grouped", f"moe.variant={moe.variant} needs moe.expert_impl=grouped")
        need(sd.rank >= 0, f"sdmoe.rank={sd.rank} must not be negative")
        need(sd.refresh_interval >= 1, f"sdmoe.refresh_interval={sd.refresh_interval} must be at least 1")
        need(set(sd.projections) <= {"gate", "up", "down"},
             f"sdmoe.projections={sd.projections}: choose from gate, up, down")
        need(sd.common in ("shared", "per_expert"), f"sdmoe.common={sd.common!r}: use shared or per_expert")
        need(sd.common_lr_scale > 0, f"sdmoe.common_lr_scale={sd.common_lr_scale} must be positive")
        need(sd.rank <= min(expert_input, ffn),
             f"sdmoe.rank={sd.rank} exceeds the smaller side of the expert matrices "
             f"({min(expert_input, ffn)}): lower sdmoe.rank")
        need(par.expert_tensor in (1, par.tensor),
             f"moe.variant={moe.variant} shards the common matrices with the experts only when parallel.expert_tensor "
             f"equals parallel.tensor ({par.tensor}) or is 1: set parallel.expert_tensor to one of them")
    need(moe.score_function in (None, "softmax", "sigmoid"),
         f"moe.score_function={moe.score_function!r} is unknown: use softmax or sigmoid (or leave it empty)")
    from megatron_sdmoe.models.common import score_function

    need(moe.expert_bias_update_rate == 0 or score_function(cfg) == "sigmoid",
         "moe.expert_bias_update_rate needs sigmoid routing scores: set moe.score_function=sigmoid (or "
         "moe.expert_bias_update_rate=0)")
    need(moe.aux_loss_type in ("batch", "sequence"), f"moe.aux_loss_type={moe.aux_loss_type!r}: use batch or sequence")
    need(moe.routed_scaling_factor > 0, f"moe.routed_scaling_factor={moe.routed_scaling_factor} must be positive")
    need(moe.capacity_factor is None or moe.capacity_factor > 0,
         f"moe.capacity_factor={moe.capacity_factor} must be positive (leave it empty for dropless routing)")
    need(moe.token_drop_policy in ("probs", "position"),
         f"moe.token_drop_policy={moe.token_drop_policy!r}: use probs or position")
    need((moe.num_groups == 0) == (moe.group_topk == 0),
         "group-limited routing needs both moe.num_groups and moe.group_topk (or neither)")
    if moe.num_groups:
        bank, bank_key = router_bank_size(cfg), "headwise.experts_per_head" if is_headwise(cfg) else "moe.num_experts"
        need(moe.num_groups > 0 and bank % moe.num_groups == 0,
             f"moe.num_groups={moe.num_groups} does not divide {bank_key}={bank} (the experts one router picks among)")
        need(0 < moe.group_topk <= moe.num_groups,
             f"moe.group_topk={moe.group_topk} must lie in [1, moe.num_groups={moe.num_groups}]")
        need(topk <= moe.group_topk * (bank // moe.num_groups),
             f"top-k={topk} exceeds the experts in moe.group_topk={moe.group_topk} groups: raise "
             "moe.group_topk or lower the top-k")
    need(tr.peak_tflops is None or tr.peak_tflops > 0, f"train.peak_tflops={tr.peak_tflops} must be positive")
    need(m.attention in ("gqa", "mla"), f"model.attention={m.attention!r}: use gqa or mla")
    need(m.attention == "gqa" or m.preset == "deepseek",
         f"model.attention=mla is DeepSeek's: use model.preset=deepseek (not {m.preset})")
    if m.attention == "mla":
        for key in ("kv_lora_rank", "qk_head_dim", "qk_rope_head_dim", "v_head_dim"):
            need(getattr(m.mla, key) >= 1, f"model.mla.{key}={getattr(m.mla, key)} must be at least 1")
        need(m.mla.q_lora_rank is None or m.mla.q_lora_rank >= 1,
             f"model.mla.q_lora_rank={m.mla.q_lora_rank} must be at least 1 (or empty)")
    need(m.vocab_size is None or m.vocab_size >= 1, f"model.vocab_size={m.vocab_size} must be at least 1")
    need(0 <= m.dense_layers < m.num_layers,
         f"model.dense_layers={m.dense_layers} must lie in [0, model.num_layers - 1]: keep at least one MoE layer")
    need(m.dense_layers == 0 or m.dense_ffn_hidden_size > 0,
         f"model.dense_layers={m.dense_layers} needs model.dense_ffn_hidden_size (the dense MLP's width)")
    need(m.dense_ffn_hidden_size % par.tensor == 0,
         f"model.dense_ffn_hidden_size={m.dense_ffn_hidden_size} is not divisible by parallel.tensor={par.tensor}")
    for key, value in [("model.num_layers", m.num_layers), ("model.hidden_size", m.hidden_size),
                       ("model.num_attention_heads", m.num_attention_heads),
                       ("model.num_query_groups", m.num_query_groups), ("moe.num_experts", moe.num_experts),
                       ("moe.topk", moe.topk), ("moe.ffn_hidden_size", moe.ffn_hidden_size),
                       ("parallel.tensor", par.tensor), ("parallel.expert", par.expert),
                       ("parallel.expert_tensor", par.expert_tensor), ("train.max_steps", tr.max_steps),
                       ("train.global_batch_size", tr.global_batch_size),
                       ("train.micro_batch_size", tr.micro_batch_size), ("data.seq_length", data.seq_length),
                       ("train.log_interval", tr.log_interval)]:
        need(value >= 1, f"{key}={value} must be at least 1")
    for key, value in [("train.eval_interval", tr.eval_interval), ("train.save_interval", tr.save_interval),
                       ("train.warmup_steps", tr.warmup_steps), ("train.exit_interval", tr.exit_interval),
                       ("train.eval_samples", tr.eval_samples), ("train.keep_checkpoints", tr.keep_checkpoints),
                       ("train.max_skipped_steps", tr.max_skipped_steps),
                       ("train.time_budget_minutes", tr.time_budget_minutes),
                       ("train.grad_clip", tr.grad_clip), ("moe.aux_loss_coeff", moe.aux_loss_coeff),
                       ("moe.z_loss_coeff", moe.z_loss_coeff), ("train.lr", tr.lr),
                       ("moe.expert_bias_update_rate", moe.expert_bias_update_rate),
                       ("model.mtp_layers", m.mtp_layers), ("model.mtp_loss_coeff", m.mtp_loss_coeff)]:
        need(value >= 0, f"{key}={value} must not be negative")
    need(0 <= tr.min_lr_ratio <= 1, f"train.min_lr_ratio={tr.min_lr_ratio} must lie in [0, 1]")
    need(tr.lr_schedule in LR_SCHEDULES, f"train.lr_schedule={tr.lr_schedule!r} is unknown: use one of "
                                          f"{', '.join(LR_SCHEDULES)}")
    need(0 < tr.decay_fraction <= 1, f"train.decay_fraction={tr.decay_fraction} must lie in (0, 1]")
    need(tr.recompute in RECOMPUTE, f"train.recompute={tr.recompute!r} is unknown: use one of {', '.join(RECOMPUTE)}")
    need(0 <= tr.recompute_layers <= m.num_layers,
         f"train.recompute_layers={tr.recompute_layers} must lie in [0, model.num_layers={m.num_layers}]")
    need(tr.recompute_layers == 0 or tr.recompute == "full",
         f"train.recompute_layers={tr.recompute_layers} applies to train.recompute=full only: set it, or drop "
         "train.recompute_layers")
    need(tr.recompute_layers == 0 or m.mtp_layers == 0,
         "train.recompute_layers with model.mtp_layers: megatron-core recomputes multi-token-prediction layers "
         "only when every layer is recomputed; set train.recompute_layers=0")
    for module in tr.recompute_modules:
        need(module in RECOMPUTE_MODULES, f"train.recompute_modules has {module!r}: "
             + UNSUPPORTED_RECOMPUTE.get(module, "unknown") + f"; choose among {', '.join(RECOMPUTE_MODULES)}")
    need(tr.recompute != "selective" or tr.recompute_modules != [],
         "train.recompute=selective with empty train.recompute_modules recomputes nothing: name modules or "
         "set train.recompute=none")
    need(len(tr.adam_betas) == 2, f"train.adam_betas must hold two numbers, got {tr.adam_betas}")
    need(tr.profile_steps == [] or (len(tr.profile_steps) == 2 and all(isinstance(s, int) for s in tr.profile_steps)
                                    and 1 <= tr.profile_steps[0] <= tr.profile_steps[1]),
         f"train.profile_steps={tr.profile_steps} must be [first, last] with 1 <= first <= last, or empty")
    need(tr.precision in ("auto", "fp32", "bf16"), f"train.precision={tr.precision!r}: use auto, fp32 or bf16")
    need(cfg.smoothing.threshold > 0, f"smoothing.threshold={cfg.smoothing.threshold} must be positive (paper: 2.5)")
    need(0 < cfg.smoothing.ema_decay < 1, f"smoothing.ema_decay={cfg.smoothing.ema_decay} must lie in (0, 1)")
    need(moe.router_dtype in ("fp32", "fp64", "none"), f"moe.router_dtype={moe.router_dtype!r}: use fp32, fp64 or none")
    need(moe.topk <= moe.num_experts,
         f"moe.topk={moe.topk} exceeds moe.num_experts={moe.num_experts}: lower moe.topk")
    need(m.hidden_size % m.num_attention_heads == 0 or m.kv_channels is not None,
         f"model.hidden_size={m.hidden_size} is not divisible by model.num_attention_heads="
         f"{m.num_attention_heads}: change one of them or set model.kv_channels")
    need(m.num_attention_heads % m.num_query_groups == 0,
         f"model.num_attention_heads={m.num_attention_heads} is not divisible by model.num_query_groups="
         f"{m.num_query_groups}: change one of them")
    need(data.valid_path == [] or data.path != [], "data.valid_path needs data.path (the sample corpus has its "
         "own split): set data.path or drop data.valid_path")
    for key, blends in [("data", data), *((f"data.stages[{i}]", stage) for i, stage in enumerate(data.stages))]:
        need(blends.test_path == [] or blends.valid_path != [],
             f"{key}.test_path needs {key}.valid_path (megatron-core reads either data.split's three splits or "
             f"separate blends for each): set {key}.valid_path too, or drop {key}.test_path")
    need((data.path == [] and data.stages == []) or data.tokenizer is not None,
         "data.path or data.stages is set but data.tokenizer is not: give the Hugging Face tokenizer directory "
         "the corpus was tokenized with")
    if data.stages:
        need(data.path == [], "data.stages replaces data.path: give each stage its own path and leave data.path empty")
        for i, stage in enumerate(data.stages):
            need(stage.path != [] and stage.steps >= 1,
                 f"data.stages[{i}] needs a path (a blend, as data.path) and steps >= 1")
        total = sum(stage.steps for stage in data.stages)
        need(total == tr.max_steps,
             f"data.stages add up to {total} steps but train.max_steps={tr.max_steps}: set train.max_steps={total}")
        need(tr.eval_samples > 0, "data.stages evaluate every seen stage at each stage's end: set train.eval_samples")
        names = [stage_name(cfg, i) for i in range(len(data.stages))]
        need(len(set(names)) == len(names), f"data.stages names {names} repeat: give each stage its own name")

    # Parallel layout (megatron-core's rules, checked here so the error is one clear line).
    need(par.zero_stage in (1, 2),
         f"parallel.zero_stage={par.zero_stage} is not supported: use 1 or 2 (ZeRO-3 partitions "
         "expert weights across ranks and, with expert parallelism, silently merges experts)")
    tp, ep, etp = par.tensor, par.expert, par.expert_tensor
    need(world_size % tp == 0,
         f"world size {world_size} is not divisible by parallel.tensor={tp}: launch a multiple of {tp} processes")
    need(world_size % (ep * etp) == 0,
         f"world size {world_size} is not divisible by parallel.expert x parallel.expert_tensor = {ep * etp}: "
         f"launch a multiple of {ep * etp} processes or lower parallel.expert")
    experts_key = ("moe.num_experts" if not is_headwise(cfg) else "headwise.experts_per_head"
                   if cfg.headwise.bank == "shared" else "headwise.heads x headwise.experts_per_head")
    need(experts % ep == 0,
         f"{experts_key}={experts} is not divisible by parallel.expert={ep}: choose an expert-"
         "parallel size that divides the number of experts")
    if is_sdmoe(cfg) and cfg.sdmoe.common == "shared":
        group, local = sdmoe_group_size(cfg), experts // ep
        need(group % local == 0 or local % group == 0,
             f"SD-MoE shares a common matrix among {group} experts, which parallel.expert={ep} splits unevenly "
             f"({local} per rank): choose an expert-parallel size whose share of experts divides {group} or is "
             "a multiple of it")
    split_by_tp = [("model.num_attention_heads", m.num_attention_heads),
                   ("model.num_query_groups", m.num_query_groups)]
    if m.attention == "mla":  # its down projections are column-parallel (models/mla.py)
        split_by_tp += [("model.mla.q_lora_rank", m.mla.q_lora_rank or 0),
                        ("model.mla.kv_lora_rank + model.mla.qk_rope_head_dim",
                         m.mla.kv_lora_rank + m.mla.qk_rope_head_dim)]
    for key, value in split_by_tp:
        need(value % tp == 0, f"{key}={value} is not divisible by parallel.tensor={tp}: change one of them")
    need(ffn % etp == 0, f"the experts' FFN width {ffn} is not divisible by parallel.expert_tensor={etp}")
    need(m.make_vocab_size_divisible_by % tp == 0,
         f"model.make_vocab_size_divisible_by={m.make_vocab_size_divisible_by} is not divisible by "
         f"parallel.tensor={tp}: make it a multiple of {tp}")
    need(tp == 1 or data.seq_length % tp == 0,
         f"data.seq_length={data.seq_length} is not divisible by parallel.tensor={tp} (sequence parallelism)")
    dp = world_size // tp
    per_step = tr.micro_batch_size * dp
    need(tr.global_batch_size % per_step == 0,
         f"train.global_batch_size={tr.global_batch_size} is not divisible by train.micro_batch_size x "
         f"data-parallel size = {tr.micro_batch_size} x {dp}: make it a multiple of {per_step}")
    need(tr.eval_interval == 0 or tr.eval_samples > 0,
         "train.eval_samples=0 leaves nothing to evaluate: set train.eval_samples or train.eval_interval=0")
    need(tr.eval_samples % per_step == 0,
         f"train.eval_samples={tr.eval_samples} is not divisible by train.micro_batch_size x data-parallel "
         f"size = {per_step}: make it a multiple of {per_step}")


def _validate_headwise(cfg: Config, need) -> None:
    hw, m = cfg.headwise, cfg.model
    need(hw.bank in ("per_head", "shared"), f"headwise.bank={hw.bank!r}: use per_head or shared")
    need(hw.heads >= 1 and m.hidden_size % hw.heads == 0,
         f"headwise.heads={hw.heads} must divide model.hidden_size={m.hidden_size} (each head takes a slice)")
    need(hw.experts_per_head >= 1, f"headwise.experts_per_head={hw.experts_per_head} must be at least 1")
    need(1 <= hw.topk <= hw.experts_per_head,
         f"headwise.topk={hw.topk} must lie in [1, headwise.experts_per_head={hw.experts_per_head}]")
    need(hw.ffn_hidden_size >= 0, f"headwise.ffn_hidden_size={hw.ffn_hidden_size} must not be negative")
    need(cfg.moe.expert_impl == "grouped",
         f"moe.variant={cfg.moe.variant} needs moe.expert_impl=grouped (head-wise experts take d/H wide inputs)")


def stage_name(cfg: Config, index: int) -> str:
    return cfg.data.stages[index].name or f"stage_{index}"


def data_parallel_size(cfg: Config, world_size: int) -> int:
    return world_size // cfg.parallel.tensor


def grad_accumulation_steps(cfg: Config, world_size: int) -> int:
    return cfg.train.global_batch_size // (cfg.train.micro_batch_size * data_parallel_size(cfg, world_size))


# ---------------------------------------------------------------------------------------------
# What the MoE variant builds

VARIANTS = ("topk", "sdmoe", "headwise", "headwise_sdmoe")
LR_SCHEDULES = ("cosine", "wsd", "constant")
RECOMPUTE = ("none", "full", "selective")
# megatron-core's selective recompute modules that run with this project's layer specs
RECOMPUTE_MODULES = ("moe", "shared_experts", "mlp")
# and why the others do not: megatron-core 0.19.2's CheckpointWithoutOutput (behind layernorm,
# mla_up_proj and moe_act) sets `fp8 = fp8 is not None`, so it always takes its Transformer Engine
# FP8 branch and raises NameError without Transformer Engine
UNSUPPORTED_RECOMPUTE = {
    "layernorm": "megatron-core 0.19.2 recomputes norms only with Transformer Engine",
    "mla_up_proj": "megatron-core 0.19.2 recomputes MLA's up projections only with Transformer Engine",
    "moe_act": "it needs megatron-core's own grouped-GEMM experts (recompute moe instead)",
    "core_attn": "the fused attention kernel keeps no score matrix, so there is nothing to save",
}


def recompute_label(cfg: Config) -> str:
    """train.recompute with its layers or modules, for reports and the start line."""
    tr = cfg.train
    if tr.recompute == "selective":
        return f"selective: {', '.join(tr.recompute_modules)}"
    if tr.recompute == "full" and tr.recompute_layers:
        return f"full, the first {tr.recompute_layers} layers"
    return tr.recompute


def is_headwise(cfg: Config) -> bool:
    return cfg.moe.variant in ("headwise", "headwise_sdmoe")


def is_sdmoe(cfg: Config) -> bool:
    return cfg.moe.variant in ("sdmoe", "headwise_sdmoe")


def router_bank_size(cfg: Config) -> int:
    """Experts one router picks among: the layer's, or one head's bank."""
    return cfg.headwise.experts_per_head if is_headwise(cfg) else cfg.moe.num_experts


def routed_experts(cfg: Config) -> int:
    """Routed experts in one MoE layer (every head's bank with headwise.bank=per_head)."""
    per_head = is_headwise(cfg) and cfg.headwise.bank == "per_head"
    return router_bank_size(cfg) * (cfg.headwise.heads if per_head else 1)


def routed_topk(cfg: Config) -> int:
    """Experts one token (head-wise: one head's slice of it) is sent to."""
    return cfg.headwise.topk if is_headwise(cfg) else cfg.moe.topk


def expert_ffn_hidden_size(cfg: Config) -> int:
    return (is_headwise(cfg) and cfg.headwise.ffn_hidden_size) or cfg.moe.ffn_hidden_size


def expert_input_size(cfg: Config) -> int:
    """Width of what a routed expert reads: the hidden size, or one head's slice of it."""
    return cfg.model.hidden_size // (cfg.headwise.heads if is_headwise(cfg) else 1)


def sdmoe_group_size(cfg: Config) -> int:
    """Experts that share one SD-MoE common matrix (sdmoe.common=shared): the layer's, or one head's bank."""
    return router_bank_size(cfg)
