"""Typed configuration: dataclasses, YAML loading, dotted `key=value` overrides, and what the
settings imply (the MoE variant's experts, accumulation steps).

One `Config` object flows from the command line to every component. Loading checks keys and
types; `validation.validate(cfg, world_size)` checks the values against each other and the
parallel layout. Every problem raises `UserError` with one line that names the key and the fix.
"""
from __future__ import annotations

import dataclasses
import difflib
import itertools
import os
import re
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
class YarnConfig:
    """YaRN RoPE scaling (model.rope_scaling: yarn) in transformers' terms: DeepSeek-V2/V3's and
    Qwen3's long-context setting."""

    factor: float = 40.0  # context extension: frequencies below the ramp are divided by this
    original_max_position_embeddings: int = 4096  # the context the unscaled frequencies were trained at
    beta_fast: float = 32.0  # rotations per original context above which a frequency is kept
    beta_slow: float = 1.0  # ... below which it is divided by `factor` (a linear ramp between)
    mscale: float = 1.0  # with mscale_all_dim > 0: cos/sin x m(mscale) / m(mscale_all_dim), m(s) = 0.1 s ln(factor) + 1
    mscale_all_dim: float = 0.0  # > 0 (DeepSeek): softmax scale x m(mscale_all_dim)^2 (MLA); 0: cos/sin x m(1)


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
    rope_scaling: str = "none"  # none | yarn (see model.yarn)
    yarn: YarnConfig = field(default_factory=YarnConfig)
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
    diag_interval: int = 0  # steps between specialisation diagnostics (0: off); see docs/methods.md section 3
    diag_rank: int = 8  # k of the singular subspaces the diagnostics compare
    diag_position_buckets: int = 1  # route composition labels: source dataset x this many position buckets


@dataclass
class SDMoEConfig:
    """Spectral-decoupled experts (moe.variant: sdmoe); see docs/sdmoe.md."""

    rank: int = 8  # k: rank of the common basis; 0 reduces SD-MoE to the baseline exactly
    refresh_interval: int = 16  # T: optimizer steps between basis refreshes
    projections: list = field(default_factory=lambda: ["gate", "up", "down"])  # which are decoupled
    common: str = "shared"  # shared (one C per router's experts: the layer's, or a head's) | per_expert (C_e each)
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
    """Parametric singularity smoothing (docs/methods.md section 5, arXiv 2602.01308); see docs/smoothing.md."""

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
    batch_size_schedule: Optional[str] = None  # batch warmup by tokens, '0:256 10B:1024' (ends at global_batch_size)
    micro_batch_size: int = 4  # sequences per forward pass on one data-parallel rank
    lr: float = 3e-3
    lr_schedule: str = "cosine"  # after warmup: cosine decay | wsd (constant, then linear decay) | constant
    lr_schedule_unit: str = "steps"  # the schedule's clock: steps | tokens (counted in global_batch_size batches)
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
    # Batches not trained on, as 1-based steps ["1201-1260", 1300]: the step, its data and the LR
    # schedule move on without an update (leaving out the data that led to a loss spike)
    skip_batches: list = field(default_factory=list)


@dataclass
class StageConfig:
    """One stage of continual training (docs/methods.md section 4)."""

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
    # attend only within each document of a packed sequence (megatron-core's inter_document_masking:
    # document boundaries from the index, not from EOD tokens); false: across the whole sequence
    document_mask: bool = False
    # no loss on the token after each EOD (the next document's first, unpredictable across the
    # boundary): megatron-core's eod_mask_loss, in training and evaluation
    eod_mask_loss: bool = False
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


class _ConfigLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping (it keeps the last silently),
    and reading whole numbers that are not plain decimals as the text they are written as: YAML 1.1,
    which PyYAML follows, reads `98:2:0` and `24:00:00` as base-60 numbers (352920, 86400), `0755` as
    octal (493), `0x10` and `1_000` as 16 and 1000. So a text setting (run.dir=0755) keeps what was
    written, and a number setting refuses it rather than taking another number."""

    def construct_mapping(self, node, deep=False):
        # its own keys: those a merge key (`<<: *defaults`) brings may be set again, as YAML means
        keys = [self.construct_object(key, deep=deep) for key, _ in node.value if key.tag != "tag:yaml.org,2002:merge"]
        twice = next((key for i, key in enumerate(keys) if key in keys[:i]), None)
        if twice is not None:
            raise yaml.constructor.ConstructorError(None, None, f"key {twice!r} appears twice", node.start_mark)
        return super().construct_mapping(node, deep)

    def construct_number(self, node):
        if node.tag.endswith(":int"):
            return super().construct_yaml_int(node) if _DECIMAL.fullmatch(node.value) else self.construct_scalar(node)
        return self.construct_scalar(node) if ":" in node.value else super().construct_yaml_float(node)


_DECIMAL = re.compile(r"[-+]?(0|[1-9][0-9]*)")
_NUMBER_LIKE = re.compile(r"[-+]?[0-9]")
for _tag in ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float"):
    _ConfigLoader.add_constructor(_tag, _ConfigLoader.construct_number)


def load_yaml(text: str):
    """YAML text as Python values (see _ConfigLoader); a key given twice in one mapping is an error
    (yaml.YAMLError)."""
    return yaml.load(text, Loader=_ConfigLoader)


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Config file (YAML) plus dotted `key=value` overrides -> typed Config."""
    raw: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            what = "is a directory" if path.is_dir() else "is not a file" if path.exists() else "not found"
            raise UserError(f"config file {path} {what}: pass the path of a YAML file (see configs/)")
        try:
            raw = load_yaml(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            raise UserError(f"config file {path} is not UTF-8 text: pass a YAML file (see configs/)") from None
        except yaml.YAMLError as e:
            raise UserError(f"config file {path} is not valid YAML ({_first_line(e)}): fix the syntax")
        if raw is None:  # e.g. a redirect that failed: training on the defaults would hide it
            raise UserError(f"config file {path} is empty: pass a config with its sections (see configs/)")
        if not isinstance(raw, dict):
            raise UserError(f"config file {path} must hold a mapping of sections (run:, model:, ...)")
    for item in overrides:
        key, sep, value = item.partition("=")
        key = key.strip()  # a stray space, e.g. from a line continuation
        if not sep or not key:
            raise UserError(f"override {item!r} is not of the form dotted.key=value (e.g. train.lr=1e-3)")
        try:
            parsed = load_yaml(value) if value != "" else ""
        except yaml.YAMLError:
            parsed = value
        _set_dotted(raw, key.split("."), parsed, item)
    return _resolve_paths(_build(Config, raw, ""))


def _resolve_paths(cfg: Config) -> Config:
    """Every file and directory setting as an absolute path, `~` expanded: the run's config.yaml
    then names the same files from any working directory (sdmoe-eval, a branch), and `~/runs` is
    the home directory's, not a folder named `~`. Each rank resolves against its own working
    directory, so a relative path on node-local disks is still refused by the shared-directory
    check (runtime/agreement.py)."""
    cfg.run.dir, cfg.model.init_from = _resolved(cfg.run.dir), _resolved(cfg.model.init_from)
    cfg.data.tokenizer, cfg.data.cache_dir = _resolved(cfg.data.tokenizer), _resolved(cfg.data.cache_dir)
    for section in (cfg.data, *cfg.data.stages):
        section.path, section.valid_path, section.test_path = map(resolved_blend, (section.path, section.valid_path,
                                                                                 section.test_path))
    return cfg


def resolved_blend(items: list) -> list:
    """A blend, [prefix] or [w1, prefix1, w2, prefix2, ...], with absolute prefixes (other shapes
    as they are: parse_blend refuses them)."""
    if len(items) == 1:
        return [_resolved(items[0])]
    return [_resolved(item) if i % 2 else item for i, item in enumerate(items)] if len(items) % 2 == 0 else items


def _resolved(path):
    return os.path.abspath(os.path.expanduser(path)) if isinstance(path, str) and path else path


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def flat_items(first: dict, second: dict, prefix: str = ""):
    """(dotted key, first value, second value) for the keys both config dicts have (nested sections flattened)."""
    for key in first.keys() & second.keys():
        if isinstance(second[key], dict):
            yield from flat_items(first[key], second[key], f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", first[key], second[key]


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
        if not isinstance(key, str):
            raise UserError(f"config key {prefix}{key!r} is not a name: keys are section and setting names "
                            "(see configs/)")
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


OPTIONAL_PATHS = ("model.init_from", "data.tokenizer", "data.cache_dir")


def _coerce(value: Any, hint: Any, key: str) -> Any:
    optional = typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in typing.get_args(hint)
    base = next((a for a in typing.get_args(hint) if a is not type(None)), hint) if optional else hint
    if optional and isinstance(value, str) and not value.strip():
        if key in OPTIONAL_PATHS:  # training on without the files would hide the mistake
            raise UserError(f"{key} is empty (an unset shell variable?): give the path, or leave {key} out")
        value = None  # `key=`: leave it empty
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
        # YAML 1.1 reads on/off/yes/no as booleans and 2024-01-05 as a date; see also _ConfigLoader
        fix = (": quote it" if base is str else
               ": write it as a plain decimal" if base is int and isinstance(value, str) and _NUMBER_LIKE.match(value)
               else "")
        raise UserError(f"{key} must be a {_type_name(base)}, got {value!r}{fix}")
    return value


def _type_name(t: Any) -> str:
    return {int: "whole number", float: "number", str: "string", bool: "boolean (true/false)",
            list: "list"}.get(t, getattr(t, "__name__", str(t)))


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def stage_ends(cfg: Config) -> list[int]:
    """The step at which each stage of data.stages ends (its last step, 1-based)."""
    return list(itertools.accumulate(stage.steps for stage in cfg.data.stages))


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
LR_SCHEDULE_UNITS = ("steps", "tokens")
RECOMPUTE = ("none", "full", "selective")
# Every setting with a fixed set of values (None: may be left empty), checked in one place (validation.py)
CHOICES: dict[str, tuple] = {
    "model.attention": ("gqa", "mla"),
    "model.rope_scaling": ("none", "yarn"),
    "moe.variant": VARIANTS,
    "moe.expert_impl": ("grouped", "sequential"),
    "moe.score_function": (None, "softmax", "sigmoid"),
    "moe.aux_loss_type": ("batch", "sequence"),
    "moe.token_drop_policy": ("probs", "position"),
    "moe.router_dtype": ("fp32", "fp64", "none"),
    "sdmoe.common": ("shared", "per_expert"),
    "headwise.bank": ("per_head", "shared"),
    "train.lr_schedule": LR_SCHEDULES,
    "train.lr_schedule_unit": LR_SCHEDULE_UNITS,
    "train.recompute": RECOMPUTE,
    "train.precision": ("auto", "fp32", "bf16"),
}
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


def skipped_batch_ranges(cfg: Config) -> list[tuple[int, int]]:
    """train.skip_batches as (first, last) 1-based step ranges, both included."""
    ranges = []
    for item in cfg.train.skip_batches:
        first, dash, last = str(item).partition("-")
        try:
            ranges.append((int(first), int(last if dash else first)))
        except ValueError:
            raise UserError(f"train.skip_batches has {item!r}: give steps as FIRST-LAST or STEP, e.g. "
                            "[1201-1260, 1300]") from None
    return ranges


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
