"""Config validation: values checked against each other and the parallel layout of a world size
(megatron-core's and DeepSpeed's rules, checked here so that each error is one clear line)."""
from __future__ import annotations

import dataclasses
import math

from megatron_sdmoe.config import (CHOICES, RECOMPUTE_MODULES, UNSUPPORTED_RECOMPUTE, Config,
                                   expert_ffn_hidden_size, expert_input_size, flat_items, is_headwise, is_sdmoe,
                                   routed_experts, routed_topk, router_bank_size, sdmoe_group_size,
                                   skipped_batch_ranges, stage_ends, stage_name, to_dict)
from megatron_sdmoe.errors import UserError
from megatron_sdmoe.training.batches import schedule_entries


def validate(cfg: Config, world_size: int) -> None:
    """Check values against each other and the parallel layout of `world_size` processes."""
    from megatron_sdmoe.models import PRESETS

    need(cfg.model.preset in PRESETS, f"model.preset={cfg.model.preset!r} is unknown: use one of {', '.join(PRESETS)}")
    _check_choices(cfg)
    _check_numbers(cfg)
    if is_headwise(cfg):
        _validate_headwise(cfg)
    _validate_moe(cfg)
    _validate_model(cfg)
    _validate_train(cfg)
    _validate_data(cfg)
    _validate_layout(cfg, world_size)


def idle_settings(cfg: Config) -> list[str]:
    """A note for each setting changed from its default that does nothing while its feature is off
    (SD-MoE's with moe.variant=topk, ...). Noted at start, not refused: one override switching a
    feature off (moe.variant=topk on an SD-MoE config, an ablation's baseline) is meant."""
    m, moe, tr = cfg.model, cfg.moe, cfg.train
    features = [  # (keys, or sections ending in '.'; whether on; how to switch it on)
        ("sdmoe.", is_sdmoe(cfg), "moe.variant=sdmoe or headwise_sdmoe"),
        ("headwise.", is_headwise(cfg), "moe.variant=headwise or headwise_sdmoe"),
        ("model.mla.", m.attention == "mla", "model.attention=mla"),
        ("model.yarn.", m.rope_scaling == "yarn", "model.rope_scaling=yarn"),
        ("model.mtp_loss_coeff", m.mtp_layers > 0, "model.mtp_layers > 0"),
        ("moe.token_drop_policy", moe.capacity_factor is not None, "moe.capacity_factor set (routing is dropless)"),
        ("moe.aux_loss_type", moe.aux_loss_coeff > 0, "moe.aux_loss_coeff > 0"),
        ("moe.diag_rank moe.diag_position_buckets", moe.diag_interval > 0, "moe.diag_interval > 0"),
        ("smoothing.threshold smoothing.ema_decay", cfg.smoothing.enabled, "smoothing.enabled=true"),
        ("train.decay_fraction", tr.lr_schedule == "wsd", "train.lr_schedule=wsd"),
        ("train.min_lr_ratio", tr.lr_schedule != "constant", "train.lr_schedule=cosine or wsd"),
        ("train.recompute_modules", tr.recompute == "selective", "train.recompute=selective"),
    ]
    changed = [(key, value) for key, default, value in flat_items(to_dict(Config()), to_dict(cfg)) if value != default]
    notes = []
    for keys, on, switch in features:
        idle = [f"{key}={value}" for key, value in sorted(changed) if not on
                and any(key == k or (k.endswith(".") and key.startswith(k)) for k in keys.split())]
        if idle:
            notes.append(f"note: {', '.join(idle)} {'does' if len(idle) == 1 else 'do'} nothing without {switch}")
    return notes


def need(ok: bool, message: str) -> None:
    if not ok:
        raise UserError(message)


def _check_choices(cfg: Config) -> None:
    for key, allowed in CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        named = ", ".join(choice for choice in allowed if choice is not None)
        empty = " (or leave it empty)" if None in allowed else ""
        need(value in allowed, f"{key}={value!r} is unknown: use one of {named}{empty}")


def _validate_moe(cfg: Config) -> None:
    from megatron_sdmoe.models.common import score_function

    m, moe, par = cfg.model, cfg.moe, cfg.parallel
    topk, ffn, expert_input = routed_topk(cfg), expert_ffn_hidden_size(cfg), expert_input_size(cfg)
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
        need(router_bank_size(cfg) >= 2, f"moe.diag_interval compares experts, but each router has "
             f"{router_bank_size(cfg)}: give it 2 or more, or set moe.diag_interval=0")
        need(moe.diag_position_buckets >= 1,
             f"moe.diag_position_buckets={moe.diag_position_buckets} must be at least 1")
        need(1 <= moe.diag_rank <= min(expert_input, ffn),
             f"moe.diag_rank={moe.diag_rank} must lie in [1, {min(expert_input, ffn)}] (the experts' smaller side)")
    if is_sdmoe(cfg):
        sd = cfg.sdmoe
        need(moe.expert_impl == "grouped", f"moe.variant={moe.variant} needs moe.expert_impl=grouped")
        need(sd.rank >= 0, f"sdmoe.rank={sd.rank} must not be negative")
        need(sd.refresh_interval >= 1, f"sdmoe.refresh_interval={sd.refresh_interval} must be at least 1")
        need(set(sd.projections) <= {"gate", "up", "down"} and sd.projections != [],
             f"sdmoe.projections={sd.projections}: choose from gate, up, down (none would train the topk baseline: "
             "set moe.variant=topk for that)")
        need(sd.common_lr_scale > 0, f"sdmoe.common_lr_scale={sd.common_lr_scale} must be positive")
        need(sd.rank < min(expert_input, ffn),
             f"sdmoe.rank={sd.rank} leaves the unique parts no direction to train in: it must be below the smaller "
             f"side of the expert matrices ({min(expert_input, ffn)}): lower sdmoe.rank")
        need(par.expert_tensor in (1, par.tensor),
             f"moe.variant={moe.variant} shards the common matrices with the experts only when parallel.expert_tensor "
             f"equals parallel.tensor ({par.tensor}) or is 1: set parallel.expert_tensor to one of them")
    need(moe.expert_bias_update_rate == 0 or score_function(cfg) == "sigmoid",
         "moe.expert_bias_update_rate needs sigmoid routing scores: set moe.score_function=sigmoid (or "
         "moe.expert_bias_update_rate=0)")
    need(moe.routed_scaling_factor > 0, f"moe.routed_scaling_factor={moe.routed_scaling_factor} must be positive")
    need(moe.capacity_factor is None or moe.capacity_factor > 0,
         f"moe.capacity_factor={moe.capacity_factor} must be positive (leave it empty for dropless routing)")
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
    need(moe.topk <= moe.num_experts,
         f"moe.topk={moe.topk} exceeds moe.num_experts={moe.num_experts}: lower moe.topk")


def _validate_model(cfg: Config) -> None:
    m, par = cfg.model, cfg.parallel
    need(m.attention == "gqa" or m.preset == "deepseek",
         f"model.attention=mla is DeepSeek's: use model.preset=deepseek (not {m.preset})")
    if m.attention == "mla":
        for key in ("kv_lora_rank", "qk_head_dim", "qk_rope_head_dim", "v_head_dim"):
            need(getattr(m.mla, key) >= 1, f"model.mla.{key}={getattr(m.mla, key)} must be at least 1")
        need(m.mla.q_lora_rank is None or m.mla.q_lora_rank >= 1,
             f"model.mla.q_lora_rank={m.mla.q_lora_rank} must be at least 1 (or empty)")
        need(m.mla.qk_rope_head_dim % 2 == 0, f"model.mla.qk_rope_head_dim={m.mla.qk_rope_head_dim} must be even "
             "(RoPE rotates pairs of dimensions): e.g. 64, DeepSeek's")
    else:
        head = m.kv_channels or m.hidden_size // m.num_attention_heads
        need(head % 2 == 0, f"each attention head is {head} wide (model.kv_channels, by default model.hidden_size / "
             "model.num_attention_heads), but RoPE rotates pairs of dimensions: make it even")
    if m.rope_scaling == "yarn":
        y = m.yarn
        need(y.factor >= 1, f"model.yarn.factor={y.factor} must be at least 1")
        need(y.original_max_position_embeddings >= 1,
             f"model.yarn.original_max_position_embeddings={y.original_max_position_embeddings} must be at least 1")
        need(y.beta_fast > y.beta_slow > 0,
             f"model.yarn.beta_fast={y.beta_fast}, beta_slow={y.beta_slow}: need beta_fast > beta_slow > 0")
        need(y.mscale > 0 and y.mscale_all_dim >= 0,
             f"model.yarn.mscale={y.mscale}, mscale_all_dim={y.mscale_all_dim}: need mscale > 0 and "
             "mscale_all_dim >= 0")
    need(m.vocab_size is None or m.vocab_size >= 1, f"model.vocab_size={m.vocab_size} must be at least 1")
    # RoPE would run on past it, but an export would state a context the model was never trained at
    need(cfg.data.seq_length <= m.max_position_embeddings,
         f"data.seq_length={cfg.data.seq_length} exceeds model.max_position_embeddings={m.max_position_embeddings}: "
         "raise model.max_position_embeddings or shorten data.seq_length")
    need(0 <= m.dense_layers < m.num_layers,
         f"model.dense_layers={m.dense_layers} must lie in [0, model.num_layers - 1]: keep at least one MoE layer")
    need(m.dense_layers == 0 or m.dense_ffn_hidden_size > 0,
         f"model.dense_layers={m.dense_layers} needs model.dense_ffn_hidden_size (the dense MLP's width)")
    need(m.dense_ffn_hidden_size % par.tensor == 0,
         f"model.dense_ffn_hidden_size={m.dense_ffn_hidden_size} is not divisible by parallel.tensor={par.tensor}")
    need(m.hidden_size % m.num_attention_heads == 0 or m.kv_channels is not None,
         f"model.hidden_size={m.hidden_size} is not divisible by model.num_attention_heads="
         f"{m.num_attention_heads}: change one of them or set model.kv_channels")
    need(m.num_attention_heads % m.num_query_groups == 0,
         f"model.num_attention_heads={m.num_attention_heads} is not divisible by model.num_query_groups="
         f"{m.num_query_groups}: change one of them")


def _validate_train(cfg: Config) -> None:
    m, moe, tr = cfg.model, cfg.moe, cfg.train
    need(tr.peak_tflops is None or tr.peak_tflops > 0, f"train.peak_tflops={tr.peak_tflops} must be positive")
    need(0 <= tr.min_lr_ratio <= 1, f"train.min_lr_ratio={tr.min_lr_ratio} must lie in [0, 1]")
    need(0 < tr.decay_fraction <= 1, f"train.decay_fraction={tr.decay_fraction} must lie in (0, 1]")
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
    for module, absent, what in (("mlp", m.dense_layers == 0, "dense layers (model.dense_layers=0)"),
                                 ("shared_experts", moe.shared_expert_ffn_hidden_size == 0,
                                  "shared experts (moe.shared_expert_ffn_hidden_size=0)")):
        need(tr.recompute != "selective" or module not in tr.recompute_modules or not absent,
             f"train.recompute_modules has {module!r}, but the model has no {what}, so it would save nothing: "
             "drop it")
    need(tr.profile_steps == [] or (len(tr.profile_steps) == 2 and all(type(s) is int for s in tr.profile_steps)
                                    and 1 <= tr.profile_steps[0] <= tr.profile_steps[1] <= tr.max_steps),
         f"train.profile_steps={tr.profile_steps} must be [first, last] with 1 <= first <= last <= train.max_steps="
         f"{tr.max_steps}, or empty")
    # The run's last step and each stage's evaluate and write results: they train.
    for first, last in skipped_batch_ranges(cfg):
        need(1 <= first <= last < tr.max_steps,
             f"train.skip_batches has {first}-{last}: a range of steps FIRST-LAST with 1 <= FIRST <= LAST < "
             f"train.max_steps={tr.max_steps}")
        need(not any(first <= end <= last for end in stage_ends(cfg)),
             f"train.skip_batches has {first}-{last}, which holds the last step of a stage of data.stages (its "
             "evaluation runs there): end the range before it")
    if tr.profile_steps:
        first, last = tr.profile_steps
        skipped = {step for start, end in skipped_batch_ranges(cfg) for step in range(start, end + 1)}
        need(not set(range(first, last + 1)) <= skipped,
             f"train.profile_steps={tr.profile_steps} lie in train.skip_batches, where no step trains: profile "
             "steps that train")
    need(cfg.smoothing.threshold > 0, f"smoothing.threshold={cfg.smoothing.threshold} must be positive (paper: 2.5)")
    need(0 < cfg.smoothing.ema_decay < 1, f"smoothing.ema_decay={cfg.smoothing.ema_decay} must lie in (0, 1)")


def _validate_data(cfg: Config) -> None:
    tr, data = cfg.train, cfg.data
    need(data.valid_path == [] or data.path != [] or data.stages != [], "data.valid_path needs data.path (the "
         "sample corpus has its own split): set data.path or drop data.valid_path")
    need(data.stages == [] or (data.valid_path == [] and data.test_path == []),
         "data.valid_path and data.test_path apply to data.path: with data.stages give each stage its own "
         "(data.stages[i].valid_path, and the last stage's test_path)")
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
            need(stage.test_path == [] or i == len(data.stages) - 1,
                 f"data.stages[{i}].test_path: the test set is evaluated once, at the end of the run, on the last "
                 "stage's: move it to the last stage")
        total = sum(stage.steps for stage in data.stages)
        need(total == tr.max_steps,
             f"data.stages add up to {total} steps but train.max_steps={tr.max_steps}: set train.max_steps={total}")
        need(tr.eval_samples > 0, "data.stages evaluate every seen stage at each stage's end: set train.eval_samples")
        names = [stage_name(cfg, i) for i in range(len(data.stages))]
        need(len(set(names)) == len(names), f"data.stages names {names} repeat: give each stage its own name")


def _validate_layout(cfg: Config, world_size: int) -> None:
    """megatron-core's rules for the parallel layout, checked here so the error is one clear line."""
    m, par, tr, data = cfg.model, cfg.parallel, cfg.train, cfg.data
    experts, ffn = routed_experts(cfg), expert_ffn_hidden_size(cfg)
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
    last = schedule_entries(cfg)[-1][1]  # each batch's divisibility: preflight.py, from the resumed step on
    need(last == tr.global_batch_size, f"train.batch_size_schedule ends at a global batch of {last}, not "
         f"train.global_batch_size={tr.global_batch_size}: make its last batch train.global_batch_size")
    need(tr.eval_interval == 0 or tr.eval_samples > 0,
         "train.eval_samples=0 leaves nothing to evaluate: set train.eval_samples or train.eval_interval=0")
    need(tr.eval_samples % per_step == 0,
         f"train.eval_samples={tr.eval_samples} is not divisible by train.micro_batch_size x data-parallel "
         f"size = {per_step}: make it a multiple of {per_step}")

def _check_numbers(cfg: Config) -> None:
    """Sizes, counts and rates in their ranges, before anything divides by them or trains on them
    (a zero width, a NaN or infinite learning rate, an Adam epsilon of 0: NaN losses, not an error)."""
    m, moe, par, tr, data = cfg.model, cfg.moe, cfg.parallel, cfg.train, cfg.data
    for key, value in [("model.num_layers", m.num_layers), ("model.hidden_size", m.hidden_size),
                       ("model.num_attention_heads", m.num_attention_heads),
                       ("model.num_query_groups", m.num_query_groups), ("moe.num_experts", moe.num_experts),
                       ("moe.topk", moe.topk), ("moe.ffn_hidden_size", moe.ffn_hidden_size),
                       ("parallel.tensor", par.tensor), ("parallel.expert", par.expert),
                       ("parallel.expert_tensor", par.expert_tensor), ("train.max_steps", tr.max_steps),
                       ("model.make_vocab_size_divisible_by", m.make_vocab_size_divisible_by),
                       ("model.kv_channels", 1 if m.kv_channels is None else m.kv_channels),
                       ("model.rotary_base", m.rotary_base),
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
                       ("moe.z_loss_coeff", moe.z_loss_coeff), ("train.weight_decay", tr.weight_decay),
                       ("moe.expert_bias_update_rate", moe.expert_bias_update_rate),
                       ("model.mtp_layers", m.mtp_layers), ("model.mtp_loss_coeff", m.mtp_loss_coeff),
                       ("sdmoe.power_iterations", cfg.sdmoe.power_iterations),
                       ("sdmoe.oversample", cfg.sdmoe.oversample)]:
        need(value >= 0, f"{key}={value} must not be negative")
    for key, value in [("train.lr", tr.lr), ("train.adam_eps", tr.adam_eps), ("model.norm_epsilon", m.norm_epsilon),
                       ("model.init_method_std", m.init_method_std)]:
        need(math.isfinite(value) and value >= 0, f"{key}={value} must be a finite number, not negative: "
             "give one (see the README's config reference)")
    for key, value in [("train.adam_eps", tr.adam_eps), ("model.norm_epsilon", m.norm_epsilon),
                       ("model.init_method_std", m.init_method_std)]:
        need(value > 0, f"{key}={value} must be positive (0 divides by zero): give e.g. its default")
    for key, value in _settings(cfg, int):  # megatron-core and torch hold sizes and counts in 32 or 64 bits
        need(value < 2 ** 31 or key == "train.seed", f"{key}={value} is out of range: give a number below 2**31")
    for key, value in _settings(cfg, float):  # inf and NaN train to NaN (or crash in megatron-core)
        need(math.isfinite(value) or (key == "train.time_budget_minutes" and value == math.inf),
             f"{key}={value} must be a finite number: give one (see the README's config reference)")
    need(len(tr.adam_betas) == 2 and all(isinstance(b, (int, float)) and 0 <= b < 1 for b in tr.adam_betas),
         f"train.adam_betas={tr.adam_betas} must be two numbers in [0, 1), e.g. [0.9, 0.95]")
    need(0 <= tr.seed < 2 ** 32, f"train.seed={tr.seed} must lie in [0, 2**32 - 1] (numpy's range)")
    need(cfg.run.dir.strip() != "", "run.dir is empty (an unset shell variable?): give the run directory")
    check_split(data.split)


def _settings(cfg: Config, kind: type) -> list[tuple[str, object]]:
    """(dotted key, value) of every setting of a section (not nested) held as `kind`."""
    return [(f"{section.name}.{setting.name}", getattr(getattr(cfg, section.name), setting.name))
            for section in dataclasses.fields(cfg) if dataclasses.is_dataclass(getattr(cfg, section.name))
            for setting in dataclasses.fields(getattr(cfg, section.name))
            if type(getattr(getattr(cfg, section.name), setting.name)) is kind]


def check_split(split: str) -> None:
    """data.split: train,validation,test weights (one to three), the train weight positive."""
    try:
        weights = [float(w) for w in str(split).split(",")]
    except ValueError:
        weights = []
    if not 1 <= len(weights) <= 3 or any(not math.isfinite(w) or w < 0 for w in weights) or weights[0] <= 0:
        raise UserError(f"data.split={split!r} is not of the form train,validation,test with a positive train weight: "
                        "use e.g. 98,2,0")


def _validate_headwise(cfg: Config) -> None:
    hw, m = cfg.headwise, cfg.model
    need(hw.heads >= 1 and m.hidden_size % hw.heads == 0,
         f"headwise.heads={hw.heads} must divide model.hidden_size={m.hidden_size} (each head takes a slice)")
    need(hw.experts_per_head >= 1, f"headwise.experts_per_head={hw.experts_per_head} must be at least 1")
    need(1 <= hw.topk <= hw.experts_per_head,
         f"headwise.topk={hw.topk} must lie in [1, headwise.experts_per_head={hw.experts_per_head}]")
    need(hw.ffn_hidden_size >= 0, f"headwise.ffn_hidden_size={hw.ffn_hidden_size} must not be negative")
    need(cfg.moe.expert_impl == "grouped",
         f"moe.variant={cfg.moe.variant} needs moe.expert_impl=grouped (head-wise experts take d/H wide inputs)")
