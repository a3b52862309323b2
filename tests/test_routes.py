"""sdmoe-eval --routes: each expert's load, the tokens it takes (as a share of their rows) and each
source dataset's lift equal what transformers' routers give on the same validation samples (the
checkpoint exported with sdmoe-convert, its router logits' top-k), and so do each token's experts
of a text (--routes-text); none of it depends on the layout the checkpoint is evaluated in; the
plot is written; the run directory is left alone."""
import json
import re
from collections import Counter

import pytest
import torch
import yaml

from conftest import REPO, launch, launch_module, metrics, run_command
from test_convert import load_exported

EVAL = "megatron_sdmoe.evaluate"
ALL_TOKENS = ["--routes", "--routes-top", "100000", "--routes-min-count", "1"]
TEXT = "The value of the string is a suite of tests, AND THE STATEMENT RETURNS NONE."


@pytest.fixture(scope="module")
def run(domains, tmp_path_factory):
    """4 steps on a blend of two corpora (one upper-cased), validated on the blend every 2 steps, with
    the diagnostics on."""
    run = tmp_path_factory.mktemp("routes") / "run"
    launch(run, 1, f"data.path=[1, {domains['prose']}, 1, {domains['shout']}]",
           f"data.tokenizer={domains['tokenizer']}", "train.max_steps=4", "train.eval_samples=16",
           "train.eval_interval=2", "moe.diag_interval=4")
    return run


def routes(run, out, nproc: int = 1, *args: str) -> dict:
    launch_module(EVAL, [str(run), *args, *ALL_TOKENS, "--json", str(out)], nproc)
    return json.loads(out.read_text())


def transformers_routes(run, hf_dir) -> tuple[list[list[Counter]], Counter, list[str]]:
    """Per layer and expert, {(domain, token): rows reaching it} from the exported model's router
    logits (top-k) on the run's validation samples, and {(domain, token): rows}."""
    from megatron_sdmoe.config import load_config
    from megatron_sdmoe.data import build_datasets, get_batch, load_tokenizer
    from megatron_sdmoe.training.stages import domain_names

    cfg = load_config(run / "config.yaml")
    tr = cfg.train
    valid = build_datasets(cfg, load_tokenizer(cfg.data.tokenizer), tr.max_steps * tr.global_batch_size,
                           tr.eval_samples).valid
    hf = load_exported(hf_dir)
    k, experts = hf.config.num_experts_per_tok, hf.config.num_experts
    reaching = [[Counter() for _ in range(experts)] for _ in range(hf.config.num_hidden_layers)]
    rows = Counter()
    batch = get_batch(valid, list(range(tr.eval_samples)))
    with torch.no_grad():
        logits = hf(batch["tokens"], output_router_logits=True).router_logits  # per layer [b x s, E]
    labels = list(zip(batch["domain"].repeat_interleave(batch["tokens"].shape[1]).tolist(),
                      batch["tokens"].flatten().tolist()))
    rows.update(labels)
    for layer, layer_logits in enumerate(logits):
        for label, chosen in zip(labels, layer_logits.topk(k, dim=-1).indices.tolist()):
            for expert in chosen:
                reaching[layer][expert][label] += 1
    return reaching, rows, domain_names(cfg.data.path)


def text_file(tmp_path):
    (tmp_path / "text.txt").write_text(TEXT)
    return str(tmp_path / "text.txt")


def test_routes_equal_transformers_routers(run, tmp_path):
    before = sorted((str(p), p.stat().st_mtime_ns) for p in run.rglob("*") if "data_cache" not in p.parts)
    result = routes(run, tmp_path / "routes.json", 1, "--routes-plot", str(tmp_path / "routes.png"),
                    "--routes-text", text_file(tmp_path))
    assert (tmp_path / "routes.png").stat().st_size > 0
    assert sorted((str(p), p.stat().st_mtime_ns) for p in run.rglob("*") if "data_cache" not in p.parts) == before
    assert run_command("megatron_sdmoe.convert.cli", "to-hf", run, tmp_path / "hf").returncode == 0
    reaching, rows, domains = transformers_routes(run, tmp_path / "hf")
    assert result["routes"]["datasets"] == domains and len(domains) == 2
    assert [layer["router"] for layer in result["routes"]["routers"]] == [f"decoder.layers.{i}.mlp.router"
                                                               for i in range(len(reaching))]
    token_rows = Counter()
    for (_domain, token), n in rows.items():
        token_rows[token] += n
    total = sum(token_rows.values())
    for layer, expected in zip(result["routes"]["routers"], reaching):
        assert layer["rows"] == total
        routings = sum(sum(c.values()) for c in expected)
        for entry, counts in zip(layer["per_expert"], expected, strict=True):
            assert entry["load"] == pytest.approx(sum(counts.values()) / routings, abs=1e-12)
            by_token = Counter()
            for (_domain, token), n in counts.items():
                by_token[token] += n
            listed = {t["id"]: (t["share"], t["rows"]) for t in entry["top_tokens"] if t["share"] > 0}
            assert listed == {token: (pytest.approx(n / token_rows[token]), token_rows[token])
                              for token, n in by_token.items()}
            shares = [t["share"] for t in entry["top_tokens"]]
            assert shares == sorted(shares, reverse=True)
            for d, domain in enumerate(domains):
                in_domain = sum(n for (dd, _), n in counts.items() if dd == d)
                of_domain = sum(n for (dd, _), n in rows.items() if dd == d)
                assert entry["domain_lift"][domain] == pytest.approx(
                    in_domain / sum(counts.values()) / (of_domain / total)), (layer["router"], domain)
        # each token's largest share, row-weighted
        largest = Counter()
        for counts in expected:
            for token in token_rows:
                largest[token] = max(largest[token], sum(n for (_, t), n in counts.items() if t == token))
        assert layer["token_concentration"] == pytest.approx(sum(largest.values()) / total)

    # the text's tokens: each one's experts, by routing weight, as transformers' router logits rank them
    from megatron_sdmoe.config import load_config
    from megatron_sdmoe.data import load_tokenizer

    tokenizer = load_tokenizer(load_config(run / "config.yaml").data.tokenizer)
    tokens = torch.tensor(tokenizer.tokenize(TEXT))
    hf = load_exported(tmp_path / "hf")
    with torch.no_grad():
        logits = hf(tokens[None], output_router_logits=True).router_logits
    text = result["text_routes"]
    assert text["tokens"] == [tokenizer.detokenize([t]) for t in tokens.tolist()] and len(tokens) > 10
    assert list(text["routers"]) == [layer["router"] for layer in result["routes"]["routers"]]
    for chosen, layer_logits in zip(text["routers"].values(), logits, strict=True):
        assert chosen == layer_logits.topk(hf.config.num_experts_per_tok, dim=-1).indices.tolist()


def test_training_logs_each_routers_token_concentration(run, tmp_path):
    """With the diagnostics on, every evaluation logs each router's token concentration on the
    validation tokens: at the last step, what sdmoe-eval --routes reports for its checkpoint."""
    logged = [row for row in metrics(run) if "val_token_concentration" in row]
    assert [row["step"] for row in logged] == [2, 4]
    result = routes(run, tmp_path / "routes.json")
    assert logged[-1]["val_token_concentration"] == pytest.approx(
        [layer["token_concentration"] for layer in result["routes"]["routers"]], rel=1e-12)
    for layer, value in zip(result["routes"]["routers"], logged[0]["val_token_concentration"], strict=True):
        assert layer["uniform_concentration"] < value <= 1.0


@pytest.mark.parametrize("layout", [["parallel.expert=2"], ["parallel.tensor=2"]], ids=["EP2", "TP2"])
def test_routes_do_not_depend_on_the_layout(layout, run, tmp_path):
    one = routes(run, tmp_path / "one.json", 1, "--routes-text", text_file(tmp_path))
    two = routes(run, tmp_path / "two.json", 2, *layout, "--routes-text", text_file(tmp_path))
    assert two["routes"] == one["routes"]
    assert two["text_routes"] == one["text_routes"]


def test_head_wise_routes(tmp_path):
    """Per-head banks: a head's sub-tokens reach only its bank, so each token's shares over a bank's
    experts add up to top-k; the same at EP2 as in one process."""
    run = tmp_path / "run"
    config = REPO / "configs" / "tiny-headwise.yaml"
    launch(run, 1, "train.max_steps=2", config=config)
    one = routes(run, tmp_path / "one.json")
    assert routes(run, tmp_path / "two.json", 2, "parallel.expert=2")["routes"] == one["routes"]
    for layer in one["routes"]["routers"]:
        assert layer["banks"] == 4 and layer["experts"] == 16
        bank_size = layer["experts"] // layer["banks"]
        for bank in range(layer["banks"]):
            experts = layer["per_expert"][bank * bank_size:(bank + 1) * bank_size]
            assert sum(e["load"] for e in experts) == pytest.approx(1 / layer["banks"])
            shares, rows = Counter(), {}
            for entry in experts:
                for token in entry["top_tokens"]:
                    shares[token["id"]] += token["share"]
                    rows.setdefault(token["id"], token["rows"])
            assert all(total == pytest.approx(layer["topk"]) for total in shares.values())
            assert sum(rows.values()) == layer["rows"] // layer["banks"]  # one head's sub-tokens: one per token


def test_routes_text_report(run, tmp_path):
    long = tmp_path / "long.txt"  # more tokens than a sequence holds: the report says where it stops
    long.write_text(TEXT * 40)
    proc = launch_module(EVAL, [str(run), "--routes", "--routes-top", "2", "train.eval_samples=8",  # in any order
                                "--routes-text", str(long)], 1)
    lines = proc.stdout.splitlines()
    seq = yaml.safe_load((run / "config.yaml").read_text())["data"]["seq_length"]
    header = next(line for line in lines if line.startswith(f"routes of {long}"))
    assert re.fullmatch(re.escape(f"routes of {long}, its first {seq} of ") + r"\d+" +
                        re.escape(" tokens (data.seq_length) (each token's experts, by routing weight):"), header)
    first = lines.index("routes on the validation tokens:") + 1
    assert lines[first].startswith("decoder.layers.0.mlp.router (8 experts, top-2, 512 rows): token concentration ")
    assert lines[first + 1].startswith("  expert   0  load ") and "  lift prose " in lines[first + 1]
    assert lines[first + 1].count(") ") + lines[first + 1].endswith(")") <= 2  # two tokens at most


def test_a_plot_that_cannot_be_written_is_refused_first(run, tmp_path):
    # refused once the processes have met (a process of its own: it leaves them so)
    proc = run_command(EVAL, run, "--routes-plot", tmp_path / "missing" / "routes.png", process=True)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert f"--routes-plot {tmp_path / 'missing' / 'routes.png'}: directory" in proc.stderr
    proc = run_command(EVAL, run, "--routes-plot", tmp_path / "routes.txt")  # no image format
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"error: --routes-plot {tmp_path / 'routes.txt'}: matplotlib writes no .txt images: end the name in .png "
        "(or .pdf, .svg)"], proc.stderr
