"""sdmoe-budget: its top proposal for the tiny config holds the flat MoE's routed-expert budget in
the model it builds, the paper's routing-path arithmetic, and the command line."""
import json
import re

import pytest
import torch

from conftest import CONFIG, run_command

from megatron_sdmoe.budget import DEFAULT_HEADS, budget, head_counts, routing_paths
from megatron_sdmoe.config import load_config
from megatron_sdmoe.errors import UserError

VOCAB = 1000


def built_routed_parameters(cfg, experts_per_token: int) -> tuple[int, int]:
    """The built model's routed-expert parameters: all of them, and one token's (one expert's
    weights, read off each layer's stacked tensors, times the experts a token visits)."""
    from megatron_sdmoe.models import build_model

    experts = [p for name, p in build_model(cfg, VOCAB, torch.float32).named_parameters() if ".experts." in name]
    return sum(p.numel() for p in experts), sum(p[0].numel() for p in experts) * experts_per_token


def test_top_proposal_holds_the_flat_budget_in_the_built_model(single_process_groups):
    flat, proposals = budget(load_config(CONFIG), list(DEFAULT_HEADS), VOCAB)
    best = proposals[0]
    assert (best.routed_total, best.routed_active) == (flat.routed_total, flat.routed_active)
    flat_cfg = load_config(CONFIG, flat.overrides.split())
    headwise_cfg = load_config(CONFIG, best.overrides.split())  # the line a user pastes
    assert headwise_cfg.headwise.heads == best.heads > 1
    built_flat = built_routed_parameters(flat_cfg, flat_cfg.moe.topk)
    built_headwise = built_routed_parameters(headwise_cfg, headwise_cfg.headwise.heads * headwise_cfg.headwise.topk)
    layers = flat_cfg.model.num_layers  # all MoE layers in the tiny config
    assert built_headwise == built_flat == (flat.routed_total * layers, flat.routed_active * layers)


def test_paper_routing_paths():
    """docs/methods.md section 2: 8 heads x 4 experts top-1 against a flat 26 experts top-5."""
    headwise = ["moe.variant=headwise", "headwise.heads=8", "headwise.experts_per_head=4", "headwise.topk=1"]
    assert routing_paths(load_config(CONFIG, headwise)) == 4**8 == 65_536
    assert routing_paths(load_config(CONFIG, ["moe.num_experts=26", "moe.topk=5"])) == 65_780


def test_cli_table_json_and_bad_input():
    def run(*args, process=False):
        return run_command("megatron_sdmoe.budget", CONFIG, *args, process=process)

    table = run(f"model.vocab_size={VOCAB}", "--top", "2")
    assert table.returncode == 0, table.stderr
    assert "routed total" in table.stdout and "moe.variant=headwise headwise.heads=" in table.stdout
    overrides = table.stdout.split("overrides:\n")[1].splitlines()
    assert [line.split()[0] for line in overrides] == ["flat", "1", "2"]

    data = json.loads(run(f"model.vocab_size={VOCAB}", "--heads", "4", "--json").stdout)
    assert data["flat"]["paths"] == 28  # C(8, 2)
    best = data["proposals"][0]
    assert best["mismatch"] == 0 and best["paths"] == 4**4  # C(4, 1) per head
    assert best["overrides"] == ("moe.variant=headwise headwise.heads=4 headwise.experts_per_head=4 headwise.topk=1 "
                                 "headwise.ffn_hidden_size=256 headwise.bank=per_head")

    bad = run("--heads", "3,5", process=True)
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.strip().splitlines() == ["error: none of --heads 3,5 divides model.hidden_size=128: pick head "
                                               "counts that do (e.g. 2,4,8,16)"]


def test_head_counts_each_once_and_only_divisors():
    """--heads 2,2,3,4 on a width of 64: each proposal once (it was listed twice), 3 left out."""
    assert head_counts("2,2,3,4", 64) == [2, 4]
    for requested in ("0,4", "-4,4", "2,x"):
        with pytest.raises(UserError, match=re.escape(f"--heads {requested!r} is not a comma-separated list of "
                                                      "positive whole numbers")):
            head_counts(requested, 64)
