"""Conversion to and from Hugging Face transformers, against transformers itself: an exported
model, loaded with AutoModelForCausalLM.from_pretrained, gives this system's logits on the same
tokens (fp32), for each family, SD-MoE experts (exported as plain ones) and checkpoints saved
at EP2 and TP2; transformers -> this system -> transformers is bit-identical (Qwen); bad input exits 2."""
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from conftest import REPO, launch, metrics, run_env

from megatron_sdmoe.config import load_config

VOCAB = 1000
CASES = {"qwen3_moe": ("tiny-qwen3-moe.yaml", []), "qwen2_moe": ("tiny-qwen2-moe.yaml", []),
         "qwen3_moe with SD-MoE": ("tiny-qwen3-moe.yaml", ["moe.variant=sdmoe", "sdmoe.rank=4"]),
         # MLA (RoPE reordered), a dense first layer, shared experts, sigmoid group-limited routing with a bias
         "deepseek": ("tiny-deepseek.yaml", [])}


def converted(tensors: dict, layer, transform) -> dict:
    """Every conversion group of `tensors` through `transform`, as sdmoe-convert groups them."""
    from megatron_sdmoe.convert.cli import conversion_groups
    from megatron_sdmoe.convert.qwen import conversion_group

    out = {}
    for prefix, names in conversion_groups(list(tensors), layer, conversion_group):
        out.update(transform(prefix, {key: tensors[name] for key, name in names.items()}))
    return out


def export(cfg, model, out_dir):
    from megatron_sdmoe.convert.cli import OURS_LAYER, adapter_for

    adapter = adapter_for(cfg.model.preset)
    state = {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}  # not _extra_state
    tensors = converted(state, OURS_LAYER, lambda group, t: adapter.to_hf(cfg, group, t))
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out_dir / "model.safetensors"))
    adapter.hf_config(cfg, model.vocab_size, torch.float32).save_pretrained(out_dir)


@pytest.mark.parametrize("name", CASES)
def test_exported_model_gives_the_same_logits_in_transformers(single_process_groups, name, tmp_path):
    from transformers import AutoModelForCausalLM

    from megatron_sdmoe.models import build_model
    from megatron_sdmoe.runtime import seed_everything

    config, overrides = CASES[name]
    cfg = load_config(REPO / "configs" / config, overrides)
    seed_everything(cfg.train.seed)
    model = build_model(cfg, VOCAB, torch.float32).eval()
    with torch.no_grad():  # routers far from uniform, so top-k choices are clear-cut
        for param_name, param in model.named_parameters():
            if param_name.endswith("router.weight"):
                param.normal_(0, 0.5)
        for buffer_name, buffer in model.named_buffers():
            if buffer_name.endswith("expert_bias"):  # DeepSeek's balancing bias steers the choice too
                buffer.normal_(0, 0.1)
    export(cfg, model, tmp_path)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    tokens = torch.randint(0, VOCAB, (2, 48), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    with torch.no_grad():
        ours = model(tokens, positions, None)
        theirs = hf(tokens).logits
    assert ours.shape == theirs.shape
    assert (ours - theirs).abs().max().item() <= 1e-4


HF_CONFIGS = {"qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM"), "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM")}


@pytest.mark.parametrize("family", HF_CONFIGS)
def test_hf_to_this_system_to_hf_is_identical(single_process_groups, family, tmp_path):
    """A transformers-initialised, transformers-saved model comes back bit for bit, config included."""
    import transformers
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from megatron_sdmoe.convert.cli import HF_LAYER
    from megatron_sdmoe.convert.qwen import config_overrides, from_hf
    from megatron_sdmoe.models import build_model

    config_class, architecture = HF_CONFIGS[family]
    hf_cfg = getattr(transformers, config_class)(
        vocab_size=1024, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, moe_intermediate_size=32, intermediate_size=32, num_experts=4, num_experts_per_tok=2,
        norm_topk_prob=family == "qwen3_moe", architectures=[architecture],
        **({"shared_expert_intermediate_size": 64} if family == "qwen2_moe" else {}))
    AutoModelForCausalLM.from_config(hf_cfg).save_pretrained(tmp_path / "hf")
    with safe_open(str(tmp_path / "hf" / "model.safetensors"), "pt") as f:
        original = {k: f.get_tensor(k) for k in f.keys()}

    cfg = load_config(None, config_overrides(hf_cfg))
    ours = converted(original, HF_LAYER, lambda group, t: from_hf(cfg, group, t))
    model = build_model(cfg, cfg.model.vocab_size, torch.float32)
    missing, unexpected = model.load_state_dict(ours, strict=False)
    assert not unexpected and all(k.endswith("_extra_state") for k in missing), (missing, unexpected)

    export(cfg, model, tmp_path / "back")
    with safe_open(str(tmp_path / "back" / "model.safetensors"), "pt") as f:
        assert sorted(f.keys()) == sorted(original)
        for key in original:
            assert torch.equal(f.get_tensor(key), original[key]), key
    back, saved = (transformers.AutoConfig.from_pretrained(tmp_path / d).to_dict() for d in ("back", "hf"))
    assert {k: v for k, v in back.items() if k != "_name_or_path"} == \
        {k: v for k, v in saved.items() if k != "_name_or_path"}


def convert(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "megatron_sdmoe.convert.cli", *map(str, args)], cwd=REPO,
                          env=run_env(), capture_output=True, text=True, timeout=900)
    assert not check or proc.returncode == 0, proc.stderr[-3000:]
    return proc


LAYOUTS = {"EP2": ["parallel.expert=2"], "TP2": ["parallel.tensor=2"]}


@pytest.mark.parametrize("config, layout", [("tiny-qwen3-moe.yaml", "EP2"), ("tiny-qwen3-moe.yaml", "TP2"),
                                            ("tiny-qwen2-moe.yaml", "EP2"), ("tiny-deepseek.yaml", "EP2")])
def test_checkpoint_of_any_layout_exports_with_the_same_logits(config, layout, tmp_path):
    from transformers import AutoModelForCausalLM

    from tests.workers.logits import TOKENS

    run, config = tmp_path / "run", REPO / "configs" / config
    launch(run, 2, "train.max_steps=2", *LAYOUTS[layout], config=config)
    launch(run, 2, *LAYOUTS[layout], str(tmp_path / "ours.pt"), module="tests.workers.logits", config=config)
    convert("to-hf", run, tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = hf(TOKENS).logits
    ours = torch.load(tmp_path / "ours.pt")
    assert ours.shape == theirs.shape
    assert (ours - theirs).abs().max().item() <= 1e-4


# the sizes of the transformers model below (conftest's SMALL would change them)
IMPORTED = ["model.num_layers=2", "model.hidden_size=64", "moe.ffn_hidden_size=32", "train.lr=0", "train.max_steps=1"]


def imported_model(tmp_path):
    """A transformers-initialised Qwen3-MoE (the sample corpus' vocabulary), imported with from-hf."""
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    hf_cfg = Qwen3MoeConfig(vocab_size=4096, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, head_dim=16, moe_intermediate_size=32, num_experts=4,
                            num_experts_per_tok=2, norm_topk_prob=True, architectures=["Qwen3MoeForCausalLM"])
    AutoModelForCausalLM.from_config(hf_cfg).save_pretrained(tmp_path / "hf")
    convert("from-hf", tmp_path / "hf", tmp_path / "imported", "data.seq_length=64")
    return tmp_path / "hf", tmp_path / "imported" / "config.yaml"


def test_hf_model_round_trips_through_training(tmp_path):
    """transformers -> from-hf -> one step at learning rate 0 at EP2 -> to-hf: the same tensors."""
    from safetensors import safe_open

    hf_dir, config = imported_model(tmp_path)
    run = tmp_path / "run"
    launch(run, 2, *IMPORTED, "parallel.expert=2", config=config)
    convert("to-hf", run, tmp_path / "back")
    with safe_open(str(hf_dir / "model.safetensors"), "pt") as f:
        original = {k: f.get_tensor(k) for k in f.keys()}
    back = {}
    for file in (tmp_path / "back").glob("*.safetensors"):
        with safe_open(str(file), "pt") as f:
            back.update({k: f.get_tensor(k) for k in f.keys()})
    assert sorted(back) == sorted(original)
    for key, tensor in original.items():
        assert torch.equal(back[key], tensor), key


def test_continued_pretraining_starts_at_the_hf_models_loss(tmp_path):
    """The imported model's validation loss in this system == transformers' on the same samples."""
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    from megatron_sdmoe.data import build_datasets, ensure_sample_corpus, get_batch, load_tokenizer

    hf_dir, config = imported_model(tmp_path)
    run = tmp_path / "run"
    launch(run, 1, *IMPORTED, "train.eval_interval=1", config=config)
    cfg = load_config(run / "config.yaml")
    tr = cfg.train
    _, valid = build_datasets(cfg, load_tokenizer(ensure_sample_corpus().tokenizer_dir),
                              tr.max_steps * tr.global_batch_size, tr.eval_samples)
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    losses = []
    for start in range(0, tr.eval_samples, tr.micro_batch_size):  # the evaluation's micro-batches
        batch = get_batch(valid, list(range(start, start + tr.micro_batch_size)))
        with torch.no_grad():
            logits = hf(batch["tokens"]).logits
        per_token = F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), reduction="none")
        mask = batch["loss_mask"].flatten()
        losses.append((per_token * mask).sum() / mask.sum())
    assert metrics(run)[0]["val_loss"] == pytest.approx(torch.stack(losses).mean().item(), abs=1e-4)


def test_bad_input_exits_2_with_one_line(tmp_path):
    import shutil

    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    hf = tmp_path / "hf"
    AutoModelForCausalLM.from_config(Qwen3MoeConfig(
        vocab_size=256, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
        moe_intermediate_size=16, num_experts=2, num_experts_per_tok=1, architectures=["Qwen3MoeForCausalLM"],
        use_sliding_window=False)).save_pretrained(hf)
    truncated = tmp_path / "truncated"
    shutil.copytree(hf, truncated)
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    sliding = tmp_path / "sliding"
    shutil.copytree(hf, sliding)
    (sliding / "config.json").write_text((hf / "config.json").read_text().replace(
        '"use_sliding_window": false', '"use_sliding_window": true'))
    (tmp_path / "exists").mkdir()
    cases = {"no checkpoint": ("to-hf", tmp_path / "no-such-run", tmp_path / "out"),
             "no model": ("from-hf", tmp_path / "no-such-model", tmp_path / "out"),
             "existing output": ("from-hf", hf, tmp_path / "exists"),
             "truncated shard": ("from-hf", truncated, tmp_path / "out"),
             "unsupported field": ("from-hf", sliding, tmp_path / "out")}
    for case, args in cases.items():
        proc = convert(*args, check=False)
        assert proc.returncode == 2, (case, proc.stderr[-2000:])
        assert len(proc.stderr.strip().splitlines()) == 1 and proc.stderr.startswith("error: "), (case, proc.stderr)
    assert "use_sliding_window" in proc.stderr
    assert not (tmp_path / "out").exists() and not list((tmp_path / "exists").iterdir())
    assert not list(tmp_path.glob(".*.tmp"))
