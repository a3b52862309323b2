"""Conversion to and from Hugging Face transformers, against transformers itself: an exported
model, loaded with AutoModelForCausalLM.from_pretrained, gives this system's logits on the same
tokens (fp32), for each family, SD-MoE experts (exported as plain ones) and checkpoints saved
at EP2 and TP2; transformers -> this system -> transformers is bit-identical; bad input exits 2."""
import io
import json
import shutil
import subprocess

import pytest
import torch
from safetensors.torch import save_file

from conftest import REPO, launch, metrics, run_command, sample_tokenizer

from megatron_sdmoe.config import is_headwise, load_config

VOCAB = 1000
V2_ROUTING = ["moe.score_function=softmax", "moe.expert_bias_update_rate=0", "moe.num_groups=8", "moe.group_topk=4",
              "model.mtp_layers=0"]
YARN = ["model.rope_scaling=yarn", "model.yarn.factor=4", "model.yarn.original_max_position_embeddings=32"]
CASES = {"qwen3_moe": ("tiny-qwen3-moe.yaml", []), "qwen2_moe": ("tiny-qwen2-moe.yaml", []),
         "qwen3_moe with SD-MoE": ("tiny-qwen3-moe.yaml", ["moe.variant=sdmoe", "sdmoe.rank=4"]),
         # a norm epsilon that moves the logits (transformers' rms_norm_eps; MLA's latent norms keep 1e-6)
         "qwen2_moe with a dense first layer": ("tiny-qwen2-moe.yaml", ["model.dense_layers=1",
                                                                      "model.dense_ffn_hidden_size=96",
                                                                      "model.norm_epsilon=0.1"]),
         # MLA (RoPE reordered), a dense first layer, shared experts, sigmoid group-limited routing with a bias
         "deepseek": ("tiny-deepseek.yaml", []),
         # a group scored by its top topk // group_topk = 2 experts, as transformers' V3 scores it
         "deepseek picking 5 in 2 groups": ("tiny-deepseek.yaml", ["moe.topk=5"]),
         "deepseek without a query latent (V2-Lite's MLA)": ("tiny-deepseek.yaml", ["model.mla.q_lora_rank=null",
                                                                                      "model.norm_epsilon=0.1"]),
         # YaRN with a partial ramp (frequencies kept, divided and in between) over the 48 tokens;
         # cos/sin scaled by m(1) (GQA); by m(mscale) / m(mscale_all_dim) and the softmax by m(mscale_all_dim)^2 (MLA)
         "qwen3_moe with YaRN": ("tiny-qwen3-moe.yaml", [*YARN, "model.rotary_base=10000"]),
         "deepseek with YaRN": ("tiny-deepseek.yaml", [*YARN, "model.rotary_base=10000", "model.yarn.mscale=1.5",
                                                      "model.yarn.mscale_all_dim=2"]),
         # softmax routing: DeepseekV2ForCausalLM, group-limited (a group's best expert) and scaled
         "deepseek routed as V2": ("tiny-deepseek.yaml", [*V2_ROUTING, "model.norm_epsilon=0.1"]),
         # ... V2-Lite's: no groups, no query latent, YaRN with its mscale
         "deepseek as V2-Lite": ("tiny-deepseek.yaml", [*V2_ROUTING, "moe.num_groups=0", "moe.group_topk=0",
                                                        "model.mla.q_lora_rank=null", *YARN, "model.yarn.mscale=0.707",
                                                        "model.yarn.mscale_all_dim=0.707"]),
         # head-wise routing: the export's own modelling code (trust_remote_code)
         "head-wise, per-head banks": ("tiny-headwise.yaml", []),
         # ... a shared bank with SD-MoE, sigmoid group-limited routing with a bias, shared experts
         "deepseek, head-wise shared bank with SD-MoE": ("tiny-deepseek.yaml", [
             "moe.variant=headwise_sdmoe", "headwise.heads=4", "headwise.experts_per_head=8", "headwise.topk=2",
             "headwise.bank=shared", "headwise.ffn_hidden_size=32", "sdmoe.rank=4"])}


def converted(tensors: dict, layer, transform) -> dict:
    """Every conversion group of `tensors` through `transform`, as sdmoe-convert groups them."""
    from megatron_sdmoe.convert.cli import conversion_groups

    out = {}
    for prefix, names in conversion_groups(list(tensors), layer):
        out.update(transform(prefix, {key: tensors[name] for key, name in names.items()}))
    return out


def export(cfg, model, out_dir):
    from megatron_sdmoe.convert.cli import OURS_LAYER, adapter_for, export_config, exported_names, write_config
    from megatron_sdmoe.models.init import weight_tensors

    adapter = adapter_for(cfg.model.preset)
    weights = weight_tensors(model)
    tensors = converted({name: weights[name] for name in exported_names(adapter, list(weights))}, OURS_LAYER,
                        lambda group, t: adapter.to_hf(cfg, group, t))
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(out_dir / "model.safetensors"))
    write_config(cfg, export_config(cfg, model.vocab_size, torch.float32), out_dir)


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
    headwise = is_headwise(cfg)
    if headwise:  # the export's own code runs only when asked for: never a plain MoE model instead
        with pytest.raises(ValueError, match="trust_remote_code"):
            AutoModelForCausalLM.from_pretrained(tmp_path)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32, trust_remote_code=headwise).eval()
    tokens = torch.randint(0, VOCAB, (2, 48), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    with torch.no_grad():
        ours = model(tokens, positions, None)
        theirs = hf(tokens).logits
    assert ours.shape == theirs.shape
    assert (ours - theirs).abs().max().item() <= 1e-4


# DeepSeek-V3's YaRN fields (every one stated, as its config.json does), at a small scale
HF_YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 32,
           "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0}


def hf_model_config(family: str, vocab_size: int = 1024, yarn: bool = False):
    """A small transformers config of each family (hidden 64, two layers, 32-wide experts)."""
    import transformers

    sizes = dict(vocab_size=vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                 moe_intermediate_size=32, num_experts_per_tok=2, norm_topk_prob=family != "qwen2_moe",
                 **(dict(rope_parameters=HF_YARN, max_position_embeddings=128) if yarn else {}))
    # the training settings DeepSeek's released configs carry, which come back as they were
    trained = dict(aux_loss_alpha=0.003, seq_aux=family == "deepseek")
    if family == "deepseek_v2":  # V2-Lite's: no query latent, greedy softmax routing, scaled
        return transformers.DeepseekV2Config(
            **{**sizes, "norm_topk_prob": False}, num_key_value_heads=4, intermediate_size=96, n_routed_experts=6,
            n_shared_experts=2, first_k_dense_replace=1, q_lora_rank=None, kv_lora_rank=16, qk_rope_head_dim=8,
            qk_nope_head_dim=16, v_head_dim=16, routed_scaling_factor=1.5, architectures=["DeepseekV2ForCausalLM"],
            **trained)
    if family == "deepseek":  # MLA with a query latent, a dense first layer, a shared expert, 2 of 3 groups
        return transformers.DeepseekV3Config(
            **sizes, num_key_value_heads=4, intermediate_size=96, n_routed_experts=6, n_shared_experts=1,
            first_k_dense_replace=1, n_group=3, topk_group=1, q_lora_rank=32, kv_lora_rank=16, num_mtp_layers=0,
            qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16, architectures=["DeepseekV3ForCausalLM"],
            **trained)
    config = getattr(transformers, {"qwen3_moe": "Qwen3MoeConfig", "qwen2_moe": "Qwen2MoeConfig"}[family])
    qwen2 = {"shared_expert_intermediate_size": 64, "mlp_only_layers": [0], "intermediate_size": 96}  # a dense layer
    return config(**sizes, num_key_value_heads=2, head_dim=16, num_experts=4,
                  architectures=[config.__name__.replace("Config", "ForCausalLM")],
                  **(qwen2 if family == "qwen2_moe" else {"intermediate_size": 32}))


def save_hf_model(hf_cfg, out_dir) -> None:
    """A transformers-initialised model, saved by transformers; DeepSeek's routing bias (zero at
    initialisation) set to random values, so that importing it is tested too."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(hf_cfg)
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.normal_(0, 0.1)
    model.save_pretrained(out_dir)


def assert_comes_back_identical(hf_dir, back_dir) -> None:
    """`hf_dir` imported in-process as sdmoe-convert from-hf imports it, then exported to
    `back_dir`: the same tensors, bit for bit, and the same config."""
    from safetensors.torch import load_file

    from megatron_sdmoe.convert.cli import HF_LAYER, import_config, read_hf_config
    from megatron_sdmoe.models import build_model

    original = load_file(hf_dir / "model.safetensors")
    adapter, cfg = import_config(read_hf_config(hf_dir), [], list(original))
    ours = converted(original, HF_LAYER, lambda group, t: adapter.from_hf(cfg, group, t))
    model = build_model(cfg, cfg.model.vocab_size, torch.float32)
    missing, unexpected = model.load_state_dict(ours, strict=False)
    assert not unexpected and all(k.endswith("_extra_state") for k in missing), (missing, unexpected)

    export(cfg, model, back_dir)
    back = load_file(back_dir / "model.safetensors")
    assert sorted(back) == sorted(original)
    for key, tensor in original.items():
        assert torch.equal(back[key], tensor), key
    configs = [{k: v for k, v in read_hf_config(d).to_dict().items() if k != "_name_or_path"}
               for d in (hf_dir, back_dir)]
    assert configs[0] == configs[1]


@pytest.mark.parametrize("family, yarn", [("qwen3_moe", False), ("qwen2_moe", False), ("deepseek", False),
                                          ("deepseek_v2", False), ("qwen3_moe", True), ("deepseek", True),
                                          ("deepseek_v2", True)])
def test_hf_to_this_system_to_hf_is_identical(single_process_groups, family, yarn, tmp_path):
    """A transformers-initialised, transformers-saved model comes back bit for bit, config included
    (YaRN's rope_parameters too: the export states every field, so a config that leaves some to
    transformers' defaults comes back with them stated)."""
    save_hf_model(hf_model_config(family, yarn=yarn), tmp_path / "hf")
    assert_comes_back_identical(tmp_path / "hf", tmp_path / "back")


@pytest.mark.parametrize("name", ["deepseek", "deepseek picking 5 in 2 groups",
                                  *[name for name in CASES if "head-wise" in name]])
def test_export_comes_back_identical(single_process_groups, name, tmp_path):
    """An export imports back and exports bit for bit again: DeepSeek-V3's multi-token-prediction
    layer (as transformers' layer num_layers), a top-k that is no multiple of the groups kept,
    head-wise models (their routing settings too)."""
    from megatron_sdmoe.models import build_model

    config, overrides = CASES[name]
    cfg = load_config(REPO / "configs" / config, overrides)
    export(cfg, build_model(cfg, VOCAB, torch.float32), tmp_path / "hf")
    assert_comes_back_identical(tmp_path / "hf", tmp_path / "back")


def convert(*args: str, check: bool = True, process: bool = True) -> subprocess.CompletedProcess:
    proc = run_command("megatron_sdmoe.convert.cli", *args, process=process)
    assert not check or proc.returncode == 0, proc.stderr[-3000:]
    return proc


LAYOUTS = {"EP2": ["parallel.expert=2"], "TP2": ["parallel.tensor=2"]}


@pytest.mark.parametrize("config, layout", [("tiny-qwen3-moe.yaml", "EP2"), ("tiny-qwen3-moe.yaml", "TP2"),
                                            ("tiny-qwen2-moe.yaml", "EP2"), ("tiny-qwen2-moe.yaml", "TP2"),
                                            ("tiny-deepseek.yaml", "EP2"), ("tiny-deepseek.yaml", "TP2"),
                                            ("tiny-headwise.yaml", "EP2")])
def test_checkpoint_of_any_layout_exports_with_the_same_logits(config, layout, tmp_path, monkeypatch):
    """The exported model's logits equal this system's under the checkpoint's layout, and its
    validation and test losses equal the ones the run measured at its last step. A head-wise
    export, which brings the run's tokenizer, imports back without running its own code."""
    from tests.workers.logits import TOKENS

    run, config, split = tmp_path / "run", REPO / "configs" / config, "data.split=96,2,2"
    launch(run, 2, "train.max_steps=2", "train.eval_interval=2", split, *LAYOUTS[layout], config=config)
    launch(run, 2, split, *LAYOUTS[layout], str(tmp_path / "ours.pt"), module="tests.workers.logits", config=config)
    convert("to-hf", run, tmp_path / "hf")
    hf = load_exported(tmp_path / "hf")
    with torch.no_grad():
        theirs = hf(TOKENS).logits
    ours = torch.load(tmp_path / "ours.pt")
    assert ours.shape == theirs.shape
    assert (ours - theirs).abs().max().item() <= 1e-4
    last = metrics(run)[-1]
    assert last["val_loss"] == pytest.approx(hf_validation_loss(tmp_path / "hf", run), abs=1e-4)
    assert last["test_loss"] == pytest.approx(hf_validation_loss(tmp_path / "hf", run, "test"), abs=1e-4)
    assert all("test_loss" not in row for row in metrics(run)[:-1])  # once, at the end
    if is_headwise(load_config(config)):  # transformers asked whether to run it, loading the tokenizer
        modelling = tmp_path / "hf" / "headwise_modeling.py"
        modelling.write_text(modelling.read_text() + f"\nopen({str(tmp_path / 'ran')!r}, 'w')\n")
        monkeypatch.setattr("sys.stdin", io.StringIO("y\n"))  # a user who would say yes
        convert("from-hf", tmp_path / "hf", tmp_path / "imported", process=False)
        assert not (tmp_path / "ran").exists()


# the sizes of hf_model_config (conftest's SMALL would change them); a step at learning rate 0
# changes no weight
IMPORTED = ["model.num_layers=2", "model.hidden_size=64", "moe.ffn_hidden_size=32", "train.lr=0", "train.max_steps=1"]


def imported_model(tmp_path, family: str):
    """A transformers-initialised model (the sample corpus' vocabulary), imported with from-hf.
    DeepSeek's bias update runs at any learning rate: at a rate of 1e-12, below the routing bias'
    float32 resolution, the bias holds still too."""
    save_hf_model(hf_model_config(family, vocab_size=4096), tmp_path / "hf")
    convert("from-hf", tmp_path / "hf", tmp_path / "imported", "data.seq_length=64", sample_tokenizer(),
            *["moe.expert_bias_update_rate=1e-12"] * (family == "deepseek"))
    return tmp_path / "hf", tmp_path / "imported" / "config.yaml"


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek"])
def test_hf_model_round_trips_through_training(family, tmp_path):
    """transformers -> from-hf -> one step at learning rate 0 at EP2 -> to-hf: the same tensors."""
    from safetensors import safe_open

    hf_dir, config = imported_model(tmp_path, family)
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


def load_exported(hf_dir):
    """The transformers model of an export (head-wise ones run the export's own code)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, trust_remote_code=True).eval()


def hf_validation_loss(hf_dir, run, split: str = "valid") -> float:
    """The loss of the transformers model in `hf_dir` on `run`'s validation (or test) samples, as
    the run's evaluation computes it (the mean of micro-batch means)."""
    import torch.nn.functional as F

    from megatron_sdmoe.data import build_datasets, ensure_sample_corpus, get_batch, load_tokenizer

    cfg = load_config(run / "config.yaml")
    tr, tokenizer = cfg.train, load_tokenizer(ensure_sample_corpus().tokenizer_dir)
    eod = tokenizer.eod
    samples = getattr(build_datasets(cfg, tokenizer,
                                     tr.max_steps * tr.global_batch_size, tr.eval_samples), split)
    hf = load_exported(hf_dir)
    losses = []
    for start in range(0, tr.eval_samples, tr.micro_batch_size):
        batch = get_batch(samples, list(range(start, start + tr.micro_batch_size)))
        with torch.no_grad():
            logits = hf(batch["tokens"]).logits
        per_token = F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), reduction="none")
        mask = (batch["tokens"] != eod if cfg.data.eod_mask_loss else torch.ones_like(batch["tokens"])).flatten().float()
        losses.append((per_token * mask).sum() / mask.sum())
    return torch.stack(losses).mean().item()


@pytest.mark.parametrize("family, variant, eod_mask_loss", [("qwen3_moe", "topk", False), ("deepseek", "topk", False),
                                                            ("deepseek", "sdmoe", False), ("qwen3_moe", "topk", True)])
def test_continued_pretraining_starts_at_the_hf_models_loss(family, variant, eod_mask_loss, tmp_path):
    """The imported model's validation loss in this system == transformers' on the same samples
    (with SD-MoE: the imported experts split into common + unique parts; with data.eod_mask_loss:
    over the tokens that do not follow an EOD)."""
    hf_dir, config = imported_model(tmp_path, family)
    run = tmp_path / "run"
    launch(run, 1, *IMPORTED, "train.eval_interval=1", f"moe.variant={variant}",
           f"data.eod_mask_loss={str(eod_mask_loss).lower()}", config=config)
    assert metrics(run)[0]["val_loss"] == pytest.approx(hf_validation_loss(hf_dir, run), abs=1e-4)


def test_an_imported_routing_bias_is_never_dropped(tmp_path):
    """A DeepSeek model's routing bias needs bias balancing on: without it, training refuses to start."""
    _, config = imported_model(tmp_path, "deepseek")
    proc = launch(tmp_path / "run", 1, *IMPORTED, "moe.expert_bias_update_rate=0", config=config, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "mlp.router.expert_bias has no place in this model" in proc.stderr.strip().splitlines()[-1]


def test_sequential_experts_are_refused_by_name(tmp_path):
    """megatron-core's SequentialMLP keeps one weight per expert, named by its local index."""
    launch(tmp_path / "run", 1, "moe.expert_impl=sequential", "train.max_steps=1")
    proc = convert("to-hf", str(tmp_path / "run"), str(tmp_path / "hf"), check=False, process=False)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'run' / 'checkpoints' / 'step_00000001'} holds megatron-core's sequential experts "
        "(moe.expert_impl=sequential), which conversion does not read: convert a run with moe.expert_impl=grouped "
        "(the default, the same model)"]
    assert not (tmp_path / "hf").exists()


def test_weights_one_rank_cannot_read(tmp_path):
    """model.init_from with each rank in its own working directory (as on two nodes' disks), a
    shard truncated on rank 1's: its read error is the error of both ranks, printed once."""
    _, config = imported_model(tmp_path, "qwen3_moe")
    for rank in (0, 1):
        shutil.copytree(tmp_path / "imported" / "weights", tmp_path / "ranks" / f"rank{rank}" / "weights")
    weights = tmp_path / "ranks" / "rank1" / "weights"
    file = json.loads((weights / "model.safetensors.index.json").read_text())["weight_map"]["output_layer.weight"]
    (weights / file).write_bytes((weights / file).read_bytes()[:1000])  # shards open when first read
    proc = launch(tmp_path / "run", 2, *IMPORTED, "parallel.expert=2", "model.init_from=weights", config=config,
                  module="tests.workers.node_local", env={"RANK_DIRS": str(tmp_path / "ranks")}, check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith(f"error: {weights / file} is not a readable safetensors file") and \
        " [seen on rank 1 of 2, host " in lines[0], lines[0]


@pytest.mark.parametrize("case, field", [
    ("rope_interleave", "rope_interleave"), ("linear RoPE scaling", "rope_type other than default or yarn"),
    ("YaRN's attention factor", "attention_factor"), ("YaRN untruncated", "truncate=false"),
    ("YaRN's mscale_all_dim alone", "mscale_all_dim without mscale"), ("bias", "attention_bias"),
    ("four per group", "num_experts_per_tok // topk_group != 2"), ("quantised", "quantization_config"),
    ("V2, two per group", "num_experts_per_tok // topk_group != 1"), ("V2, noaux_tc", "topk_method other than")])
def test_a_transformers_config_this_system_cannot_represent_is_refused_by_name(case, field):
    from megatron_sdmoe.convert import deepseek
    from megatron_sdmoe.errors import UserError

    hf = hf_model_config("deepseek_v2" if case.startswith("V2") else "deepseek")
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "rope_theta": 1e4}
    changes = {"rope_interleave": {"rope_interleave": False}, "bias": {"attention_bias": True},
               "linear RoPE scaling": {"rope_parameters": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e4}},
               "YaRN's attention factor": {"rope_parameters": {**yarn, "attention_factor": 1.2}},
               "YaRN untruncated": {"rope_parameters": {**yarn, "truncate": False}},
               "YaRN's mscale_all_dim alone": {"rope_parameters": {**yarn, "mscale_all_dim": 1.0}},
               "four per group": {"num_experts_per_tok": 4}, "quantised": {"quantization_config": {"bits": 8}},
               "V2, two per group": {"topk_method": "group_limited_greedy", "n_group": 3, "topk_group": 1},
               "V2, noaux_tc": {"topk_method": "noaux_tc"}}
    for key, value in changes[case].items():
        setattr(hf, key, value)
    with pytest.raises(UserError, match=field):
        deepseek.config_overrides(hf, [])


@pytest.mark.parametrize("config, overrides, message", [
    ("tiny-deepseek.yaml", ["moe.topk=6", "moe.group_topk=2"], "DeepseekV3 scores a group by its top 2 experts"),
    ("tiny-deepseek.yaml", ["moe.score_function=softmax", "moe.expert_bias_update_rate=0"],
     "DeepseekV2 scores a group by its top 1 expert;"),
    ("tiny-deepseek.yaml", ["moe.shared_expert_ffn_hidden_size=96"], "export a multiple of that width"),
    ("tiny-qwen3-moe.yaml", ["moe.score_function=sigmoid"], "route by a softmax"),
    ("tiny-qwen3-moe.yaml", ["moe.num_groups=2", "moe.group_topk=1"], "route by a softmax"),
    ("tiny-qwen3-moe.yaml", ["moe.shared_expert_ffn_hidden_size=128"], "has no shared expert")])
def test_a_model_transformers_cannot_represent_is_not_exported(config, overrides, message):
    from megatron_sdmoe.convert.cli import export_config
    from megatron_sdmoe.errors import UserError

    cfg = load_config(REPO / "configs" / config, overrides)
    with pytest.raises(UserError, match=message):
        export_config(cfg, 1024, torch.float32)


def test_bad_input_exits_2_with_one_line(tmp_path):

    from safetensors.torch import load_file

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
    extra = tmp_path / "extra"  # e.g. a quantised model's scales: never silently dropped
    shutil.copytree(hf, extra)
    tensors = load_file(hf / "model.safetensors")
    save_file({**tensors, "model.layers.0.mlp.experts.0.gate_proj.weight_scale_inv": torch.ones(1)},
              str(extra / "model.safetensors"), metadata={"format": "pt"})
    missing = tmp_path / "missing"
    shutil.copytree(hf, missing)
    (missing / "model.safetensors").rename(missing / "model-00001-of-00002.safetensors")
    (missing / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        name: f"model-0000{1 + ('layers' in name)}-of-00002.safetensors" for name in tensors}}))
    mixtral = tmp_path / "mixtral"  # a family with no adapter
    shutil.copytree(hf, mixtral)
    (mixtral / "config.json").write_text((hf / "config.json").read_text().replace(
        '"Qwen3MoeForCausalLM"', '"MixtralForCausalLM"').replace('"qwen3_moe"', '"mixtral"'))
    deepseek = tmp_path / "deepseek"
    save_hf_model(hf_model_config("deepseek", vocab_size=256), deepseek)
    odd = tmp_path / "odd"  # a vocabulary no tensor-parallel size divides
    save_hf_model(hf_model_config("qwen3_moe", vocab_size=257), odd)
    # another model's config.json beside the weights, or a damaged one
    edited = {"layers": (hf, '"num_hidden_layers": 1', '"num_hidden_layers": 2'),
              "heads": (hf, '"num_key_value_heads": 1', '"num_key_value_heads": 2'),
              "experts": (hf, '"moe_intermediate_size": 16', '"moe_intermediate_size": 24'),  # no reshape notices
              "vocabulary": (hf, '"vocab_size": 256', '"vocab_size": 300'),
              "rope": (hf, '"rope_theta": 10000.0', '"rope_theta": 10000.5'),  # megatron-core's RoPE base is whole
              "typed": (hf, '"rms_norm_eps": 1e-06', '"rms_norm_eps": 0'),  # transformers' fields are typed
              "dense": (hf, '"Qwen3MoeForCausalLM"', '"Qwen3ForCausalLM"'),
              "latent": (deepseek, '"q_lora_rank": 32', '"q_lora_rank": null')}
    for name, (source, old, new) in edited.items():
        shutil.copytree(source, tmp_path / name)
        assert old in (source / "config.json").read_text()
        (tmp_path / name / "config.json").write_text((source / "config.json").read_text().replace(old, new))
    layers, heads = tmp_path / "layers", tmp_path / "heads"
    index = tmp_path / "index"
    shutil.copytree(missing, index)
    (index / "model.safetensors.index.json").write_text("{")
    tokenizer = f"data.tokenizer={tmp_path}"  # past the check of the tokenizer, to the cases' own
    (tmp_path / "exists").mkdir()
    out = tmp_path / "out"
    cases = {"no checkpoint": (("to-hf", tmp_path / "no-such-run", out), "no-such-run does not exist"),
             "no model": (("from-hf", tmp_path / "no-such-model", out), "no readable Hugging Face config"),
             "existing output": (("from-hf", hf, tmp_path / "exists"), "exists"),
             "truncated shard": (("from-hf", truncated, out), "truncated"),
             "missing shard": (("from-hf", missing, out), "model-00002-of-00002.safetensors, which is missing"),
             "unsupported field": (("from-hf", sliding, out), "use_sliding_window"),
             "another family": (("from-hf", mixtral, out), "MixtralForCausalLM'] cannot be imported"),
             "overridden sizes": (("from-hf", hf, out, "moe.num_experts=4"),
                                  "overrides would describe another model than the weights (moe.num_experts: 2 -> 4)"),
             "padded vocabulary": (("from-hf", hf, out, "model.make_vocab_size_divisible_by=512"),
                                   "overrides would describe another model than the weights "
                                   "(model.make_vocab_size_divisible_by: 128 -> 512)"),
             "vocabulary TP cannot split": (("from-hf", odd, out, "parallel.tensor=2"),
                                            "the model's vocabulary of 257 rows cannot be split over "
                                            "parallel.tensor=2, and rows added to it would change its softmax: "
                                            "import at a parallel.tensor that divides 1"),
             "head-wise": (("from-hf", hf, out, "moe.variant=headwise"),
                           "overrides would describe another model than the weights (moe.variant: topk -> headwise)"),
             "unknown tensor": (("from-hf", extra, out), "weight_scale_inv has no counterpart"),
             "layers of another config": (("from-hf", layers, out), f"{layers / 'config.json'} describes 2 layers, "
                                          "but the weights hold 1 (numbered 0 to 0): restore the model's own"),
             "heads of another config": (("from-hf", heads, out), f"{heads / 'config.json'} does not describe the "
                                         "weights beside it (model.layers.0: "),
             "experts of another config": (("from-hf", tmp_path / "experts", out), "config.json gives "
                                           "model.layers.0.mlp.experts 4,608 parameters, but the weights beside it "
                                           "hold 3,072"),
             "no tokenizer": (("from-hf", hf, out), f"{hf} holds no tokenizer (tokenizer_config.json), and the "
                              f"built-in corpus's ids mean other tokens: copy the model's tokenizer files into {hf}, "
                              "or pass data.tokenizer=DIR"),
             "vocabulary of another config": (("from-hf", tmp_path / "vocabulary", out),
                                              "has vocab_size=300, but model.embed_tokens.weight holds 256 rows"),
             "fractional rope_theta": (("from-hf", tmp_path / "rope", out), "rope_theta=10000.5 is not a whole number"),
             "mistyped field": (("from-hf", tmp_path / "typed", out),
                                f"{tmp_path / 'typed' / 'config.json'}: Validation error for field 'rms_norm_eps': "
                                "TypeError: Field 'rms_norm_eps' expected float, got int (value: 0): restore"),
             "damaged index": (("from-hf", index, out), f"{index / 'model.safetensors.index.json'} is not a "
                               "readable index (JSONDecodeError: "),
             "dense model": (("from-hf", tmp_path / "dense", out), "a dense Qwen3ForCausalLM becomes an MoE with "
                             "sdmoe-convert upcycle"),
             "query latent of another config": (("from-hf", tmp_path / "latent", out),
                                                "q_lora_rank=None, but the weights hold a query latent (q_a_proj)")}
    for case, (args, message) in cases.items():
        if args[0] == "from-hf" and case != "no tokenizer":
            args = (*args, tokenizer)
        proc = convert(*args, check=False, process=case == "unknown tensor")
        assert proc.returncode == 2, (case, proc.stderr[-2000:])
        assert len(proc.stderr.strip().splitlines()) == 1 and proc.stderr.startswith("error: "), (case, proc.stderr)
        assert message in proc.stderr, (case, proc.stderr)
    assert not (tmp_path / "out").exists() and not list((tmp_path / "exists").iterdir())
    assert not list(tmp_path.glob(".*.tmp"))
