"""`sdmoe-budget CONFIG`: head-wise routing settings (MH-MoE, docs/methods.md section 2) that match the
routed-expert budget of a config's flat MoE.

    sdmoe-budget configs/tiny-qwen3-moe.yaml --heads 2,4 --top 3

The flat reference is the config's moe section (moe.num_experts E, moe.topk k, moe.ffn_hidden_size
f), whatever moe.variant says. A proposal (headwise.bank=per_head: H heads, each routing top-k_h
among its own E_h experts of width f_h that read d/H) should hold the flat's total and active
routed-expert parameters per MoE layer, exactly where the widths allow. Proposals are ranked by
the larger relative mismatch of the two, then by how far (log scale) their routing paths per token,
C(E_h, k_h)^H, lie from the flat's C(E, k).

For each H and k_h: active parameters grow linearly with f_h, so f_h = flat active / active at
f_h = 1 (rounded to a multiple of 8; tiny models take any width); total / active = E_h / k_h, so
E_h = k_h x flat total / flat active (rounded; k_h < E_h <= 64). Every number shown is the
estimator's (estimate.py) on the proposal's config; proposals the config validation refuses are
left out.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
from dataclasses import asdict, dataclass

from megatron_sdmoe.config import (Config, expert_ffn_hidden_size, load_config, routed_experts, routed_topk,
                                   router_bank_size)
from megatron_sdmoe.errors import ArgumentParser, UserError, exit_bad_input
from megatron_sdmoe.estimate import expert_parameters, parameter_blocks, routed_active, sub_tokens, vocab_size
from megatron_sdmoe.validation import validate

DEFAULT_HEADS = (2, 4, 8, 16)
TOPKS_PER_HEAD = range(1, 5)
MAX_EXPERTS_PER_HEAD = 64
FFN_MULTIPLE = 8  # f_h on tensor-core-friendly widths ...
ALIGNED_FROM_HIDDEN = 256  # ... from this hidden size on; tiny (CPU) models take any width
FLAT = {"moe.variant": "topk"}


@dataclass
class Row:
    """One MoE setting and its budget."""

    setting: str  # "flat", or the proposal's rank
    heads: int  # H (1: the flat MoE)
    experts: int  # per router: E, or E_h per head
    topk: int  # per router: k, or k_h
    ffn_hidden_size: int  # f, or f_h
    routed_total: int  # routed-expert parameters per MoE layer
    routed_active: int  # of those, the ones a token uses
    mismatch: float  # larger relative deviation of routed_total and routed_active from the flat's
    paths: int  # expert combinations a token can be routed to: C(E, k), or C(E_h, k_h)^H
    log10_paths: float
    model_total: int  # the whole model's parameters (routers, embedding, ... included)
    model_active: int
    overrides: str  # the override line that selects this setting


def headwise_settings(heads: int, experts: int, topk: int, ffn: int) -> dict:
    return {"moe.variant": "headwise", "headwise.heads": heads, "headwise.experts_per_head": experts,
            "headwise.topk": topk, "headwise.ffn_hidden_size": ffn, "headwise.bank": "per_head"}


def with_settings(cfg: Config, settings: dict) -> Config:
    """A copy of `cfg` with dotted `section.key` settings applied, as their override line would."""
    cfg = copy.deepcopy(cfg)
    for key, value in settings.items():
        section, name = key.split(".")
        setattr(getattr(cfg, section), name, value)
    return cfg


def routed_per_layer(cfg: Config) -> tuple[int, int]:
    """Routed-expert parameters of one MoE layer: all of them, and those a token uses."""
    total = expert_parameters(cfg) * routed_experts(cfg)
    return total, round(total * min(routed_active(cfg), 1.0))  # a weight several sub-tokens use counts once


def routing_paths(cfg: Config) -> int:
    """Expert combinations a token can be routed to: C(E, k), or C(E_h, k_h)^H (a choice per head)."""
    return math.comb(router_bank_size(cfg), routed_topk(cfg)) ** sub_tokens(cfg)


def row(setting: str, settings: dict, cfg: Config, flat_budget: tuple[int, int], vocab: int) -> Row:
    routed = routed_per_layer(cfg)
    mismatch = max(abs(ours - flat) / flat for ours, flat in zip(routed, flat_budget))
    blocks, paths = parameter_blocks(cfg, vocab), routing_paths(cfg)
    overrides = " ".join(f"{key}={value}" for key, value in settings.items())
    return Row(setting, sub_tokens(cfg), router_bank_size(cfg), routed_topk(cfg), expert_ffn_hidden_size(cfg),
               *routed, mismatch, paths, math.log10(paths), sum(b.params for b in blocks),
               round(sum(b.active_params for b in blocks)), overrides)


def head_counts(requested: str, hidden_size: int) -> list[int]:
    """The requested head counts H (comma-separated) that divide the hidden size."""
    try:
        heads = list(dict.fromkeys(int(h) for h in requested.split(",")))  # each once
        if min(heads) < 1:
            raise ValueError
    except ValueError:
        raise UserError(f"--heads {requested!r} is not a comma-separated list of positive whole numbers (e.g. 2,4,8)")
    usable = [h for h in heads if hidden_size % h == 0]
    if not usable:
        divisors = [h for h in range(2, hidden_size + 1) if hidden_size % h == 0][:4]
        raise UserError(f"none of --heads {requested} divides model.hidden_size={hidden_size}: pick head counts "
                        f"that do (e.g. {','.join(map(str, divisors))})")
    return usable


def candidates(cfg: Config, heads: int, topk: int, flat_budget: tuple[int, int]) -> list[dict]:
    """Settings with H = `heads` and k_h = `topk` around the exact solution: E_h and f_h rounded
    down and up."""
    total, active = flat_budget
    step = FFN_MULTIPLE if cfg.model.hidden_size >= ALIGNED_FROM_HIDDEN else 1
    # active parameters do not depend on E_h: any valid one (k_h) gives those of one unit of width
    unit = routed_per_layer(with_settings(cfg, headwise_settings(heads, topk, topk, 1)))[1] * step
    widths = {active // unit * step, -(-active // unit) * step}  # floor and ceiling
    experts = {topk * total // active, -(-topk * total // active)}
    return [headwise_settings(heads, e, topk, f) for e in sorted(experts) for f in sorted(widths)
            if topk < e <= MAX_EXPERTS_PER_HEAD and f > 0]  # E_h > k_h: a head must choose


def budget(cfg: Config, heads: list[int], vocab: int | None = None) -> tuple[Row, list[Row]]:
    """The flat MoE's row and the head-wise proposals, best first."""
    par = cfg.parallel
    gpus = max(par.tensor, par.expert * par.expert_tensor)  # the smallest layout, as sdmoe-estimate
    flat_cfg = with_settings(cfg, FLAT)
    validate(flat_cfg, gpus)
    vocab = vocab or vocab_size(cfg)
    flat_budget = routed_per_layer(flat_cfg)
    flat = row("flat", FLAT, flat_cfg, flat_budget, vocab)
    proposals, refusals = [], []
    for h in heads:
        for topk in TOPKS_PER_HEAD:
            for settings in candidates(cfg, h, topk, flat_budget):
                proposal = with_settings(cfg, settings)
                try:
                    validate(proposal, gpus)
                except UserError as e:
                    refusals.append(str(e))
                    continue
                proposals.append(row("", settings, proposal, flat_budget, vocab))
    if not proposals:
        reason = refusals[0] if refusals else f"it needs more than {MAX_EXPERTS_PER_HEAD} experts per head"
        raise UserError(f"no head-wise setting with heads {','.join(map(str, heads))} matches this MoE ({reason}): "
                        "try other --heads or a different flat MoE")
    proposals.sort(key=lambda r: (r.mismatch, abs(r.log10_paths - flat.log10_paths), r.heads, r.topk))
    for rank, proposal in enumerate(proposals, 1):
        proposal.setting = str(rank)
    return flat, proposals


def table(config: str, flat: Row, proposals: list[Row]) -> str:
    header = ["setting", "heads", "experts", "top-k", "ffn", "routed total", "routed active", "mismatch",
              "paths", "log10 paths", "model total", "model active"]
    cells = [header] + [[r.setting, str(r.heads), str(r.experts), str(r.topk), str(r.ffn_hidden_size),
                         f"{r.routed_total:,}", f"{r.routed_active:,}", f"{r.mismatch:.2%}",
                         f"{r.paths:,}" if r.paths < 10**9 else f"{r.paths:.3e}", f"{r.log10_paths:.2f}",
                         f"{r.model_total:,}", f"{r.model_active:,}"] for r in [flat, *proposals]]
    widths = [max(len(line[i]) for line in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths)))
             for line in cells]
    return "\n".join([
        f"{config}: head-wise routing (bank=per_head) matched to the flat MoE's routed experts",
        "experts, top-k, ffn: per head; routed: parameters per MoE layer (active: a token's); "
        "model: the whole model", "", *lines, "", "overrides:",
        *(f"  {r.setting:<{widths[0]}}  {r.overrides}" for r in [flat, *proposals])])


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(prog="sdmoe-budget", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="YAML config file (see configs/); its moe section is the flat MoE")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    parser.add_argument("--heads", default=",".join(map(str, DEFAULT_HEADS)),
                        help="head counts H to try, those that divide model.hidden_size (default %(default)s)")
    parser.add_argument("--top", type=int, default=5, help="proposals to show (default 5)")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = parser.parse_intermixed_args(argv)
    try:
        if args.top < 1:
            raise UserError(f"--top {args.top} must be at least 1")
        cfg = load_config(args.config, args.overrides)
        flat, proposals = budget(cfg, head_counts(args.heads, cfg.model.hidden_size))
    except UserError as e:
        exit_bad_input(e)
    proposals = proposals[:args.top]
    print(json.dumps({"flat": asdict(flat), "proposals": [asdict(r) for r in proposals]}, indent=2) if args.json
          else table(args.config, flat, proposals))


if __name__ == "__main__":
    main()
