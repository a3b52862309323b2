"""Config loading, overrides, validation, and the one-line exit-2 contract for bad input."""
import dataclasses
import importlib
import os
import re
import tomllib

import pytest

from conftest import CONFIG, REPO, python_m, run_env
from megatron_sdmoe.config import Config, load_config
from megatron_sdmoe.errors import UserError
from megatron_sdmoe.validation import idle_settings, validate


def test_yaml_and_dotted_overrides():
    cfg = load_config(CONFIG, ["train.lr=1e-3", "parallel.expert=2", "data.path=/data/a", "run.dir=/x"])
    assert isinstance(cfg, Config)
    assert cfg.train.lr == 1e-3 and cfg.parallel.expert == 2 and cfg.run.dir == "/x"
    assert cfg.data.path == ["/data/a"]  # a single prefix is a blend of one
    assert cfg.moe.num_experts == 8 and cfg.model.preset == "qwen3_moe"  # from the YAML


def test_text_settings_keep_what_was_written(monkeypatch, tmp_path):
    """Whole numbers YAML 1.1 would read as octal, hex or with digit separators stay text."""
    monkeypatch.chdir(tmp_path)
    cfg = load_config(CONFIG, ["run.dir=0755", " data.tokenizer=0x10", "data.stages=[{name: 007, path: [a], steps: 1}]",
                               "data.split=100"])
    assert (cfg.run.dir, cfg.data.tokenizer, cfg.data.stages[0].name, cfg.data.split) == \
        (f"{tmp_path}/0755", f"{tmp_path}/0x10", "007", "100")


def test_empty_values_leave_optional_settings_empty():
    cfg = load_config(CONFIG, ["moe.capacity_factor=", "moe.score_function=", "model.vocab_size="])
    assert (cfg.moe.capacity_factor, cfg.moe.score_function, cfg.model.vocab_size) == (None, None, None)


def test_paths_are_absolute_and_home_expanded(monkeypatch, tmp_path):
    """config.yaml then names the same files from any working directory, and ~/runs is no folder named ~."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", "/home/me")
    cfg = load_config(CONFIG, ["run.dir=~/runs/a", "data.cache_dir=cache", "data.tokenizer=tok",
                               "data.path=[0.3, data/a, 0.7, ~/b]", "data.valid_path=[v]", "model.init_from=w",
                               "data.stages=[{path: [s], test_path: [t], steps: 10}]"])
    assert (cfg.run.dir, cfg.data.cache_dir, cfg.data.tokenizer, cfg.model.init_from) == \
        ("/home/me/runs/a", f"{tmp_path}/cache", f"{tmp_path}/tok", f"{tmp_path}/w")
    assert cfg.data.path == [0.3, f"{tmp_path}/data/a", 0.7, "/home/me/b"] and cfg.data.valid_path == [f"{tmp_path}/v"]
    assert (cfg.data.stages[0].path, cfg.data.stages[0].test_path) == ([f"{tmp_path}/s"], [f"{tmp_path}/t"])


@pytest.mark.parametrize("override, message", [
    ("train.lrr=1", "unknown config key train.lrr; did you mean train.lr?"),
    ("bogus.x=1", "unknown config key bogus"),
    ("train.max_steps=ten", "train.max_steps must be a whole number, got 'ten'"),
    ("train.max_steps=true", "train.max_steps must be a whole number"),
    ("train.lr", "is not of the form dotted.key=value"),
    ("data.stages=[{path: [a], step: 200}]", "unknown config key data.stages[0].step; did you mean data.stages[0].steps?"),
    # YAML 1.1 reads 010 as octal 8, 1_000 as 1000, off as false and 2024-01-05 as a date
    ("train.max_steps=010", "train.max_steps must be a whole number, got '010': write it as a plain decimal"),
    ("train.max_steps=1_000", "got '1_000': write it as a plain decimal"),
    ("train.recompute=off", "train.recompute must be a string, got False: quote it"),
    ("run.dir=2024-01-05", "run.dir must be a string, got datetime.date(2024, 1, 5): quote it"),
    # an unset shell variable: without the files the run would train from scratch, or on another tokenizer
    ("model.init_from=", "model.init_from is empty (an unset shell variable?): give the path, or leave model.init_from out"),
    ("data.tokenizer=", "data.tokenizer is empty (an unset shell variable?)"),
])
def test_load_errors(override, message):
    with pytest.raises(UserError, match=re.escape(message)):
        load_config(CONFIG, [override])


@pytest.mark.parametrize("overrides, world, message", [
    (["parallel.expert=3"], 3, "moe.num_experts=8 is not divisible by parallel.expert=3"),
    (["parallel.tensor=2"], 3, "world size 3 is not divisible by parallel.tensor=2"),
    (["parallel.expert=4"], 2, "world size 2 is not divisible by parallel.expert x parallel.expert_tensor = 4"),
    (["parallel.zero_stage=3", "parallel.expert=2"], 2, "ZeRO-3 partitions expert weights"),
    (["train.global_batch_size=12"], 2, "train.global_batch_size=12 is not divisible by"),
    (["moe.topk=9"], 1, "moe.topk=9 exceeds moe.num_experts=8"),
    (["model.num_query_groups=3"], 1, "model.num_attention_heads=4 is not divisible by model.num_query_groups=3"),
    (["moe.variant=flat"], 1, "moe.variant='flat' is unknown"),
    (["moe.score_function=tanh"], 1, "moe.score_function='tanh' is unknown: use one of softmax, sigmoid (or leave it empty)"),
    (["sdmoe.common=layer"], 1, "sdmoe.common='layer' is unknown: use one of shared, per_expert"),  # also under topk
    (["data.path=/x"], 1, "data.tokenizer is not"),
    (["data.tokenizer=t", "data.stages=[{path: [a], steps: 60}, {path: [b], steps: 60}]"], 1,
     "data.stages add up to 120 steps but train.max_steps=200: set train.max_steps=120"),
    (["data.tokenizer=t", "data.path=[a]", "data.stages=[{path: [a], steps: 200}]"], 1, "data.stages replaces data.path"),
    (["data.tokenizer=t", "data.stages=[{steps: 200}]"], 1, "data.stages[0] needs a path"),
    (["data.tokenizer=t", "data.path=[a]", "data.test_path=[b]"], 1, "data.test_path needs data.valid_path"),
    (["data.tokenizer=t", "data.stages=[{path: [a], test_path: [b], steps: 200}]"], 1,
     "data.stages[0].test_path needs data.stages[0].valid_path"),
    (["moe.expert_bias_update_rate=0.001"], 1, "moe.expert_bias_update_rate needs sigmoid routing scores"),
    (["moe.num_groups=3", "moe.group_topk=1"], 1, "moe.num_groups=3 does not divide moe.num_experts=8"),
    (["moe.num_groups=4"], 1, "group-limited routing needs both"),
    (["model.dense_layers=4"], 1, "model.dense_layers=4 must lie in [0, model.num_layers - 1]"),
    (["model.dense_layers=1"], 1, "model.dense_layers=1 needs model.dense_ffn_hidden_size"),
    (["moe.capacity_factor=0"], 1, "moe.capacity_factor=0.0 must be positive"),
    (["model.attention=mla"], 1, "model.attention=mla is DeepSeek's: use model.preset=deepseek"),
    (["model.preset=deepseek", "model.attention=mla", "model.mla.kv_lora_rank=511", "parallel.tensor=2"], 2,
     "model.mla.kv_lora_rank + model.mla.qk_rope_head_dim=575 is not divisible by parallel.tensor=2"),
    (["data.seq_length=8192"], 1, "data.seq_length=8192 exceeds model.max_position_embeddings=4096"),
    (["model.rope_scaling=linear"], 1, "model.rope_scaling='linear' is unknown: use one of none, yarn"),
    (["model.rope_scaling=yarn", "model.yarn.beta_fast=0.5"], 1, "need beta_fast > beta_slow > 0"),
    (["model.rope_scaling=yarn", "model.yarn.factor=0.5"], 1, "model.yarn.factor=0.5 must be at least 1"),
    (["train.lr_schedule=linear"], 1, "train.lr_schedule='linear' is unknown: use one of cosine, wsd, constant"),
    (["train.lr_schedule_unit=samples"], 1, "train.lr_schedule_unit='samples' is unknown: use one of steps, tokens"),
    (["train.lr_schedule=wsd", "train.decay_fraction=0"], 1, "train.decay_fraction=0.0 must lie in (0, 1]"),
    (["train.recompute=partial"], 1, "train.recompute='partial' is unknown: use one of none, full, selective"),
    (["train.recompute=selective", "train.recompute_modules=[layernorm]"], 1,
     "train.recompute_modules has 'layernorm': megatron-core 0.19.2 recomputes norms only with Transformer Engine"),
    (["train.recompute=selective", "train.recompute_modules=[moe_act]"], 1,
     "'moe_act': it needs megatron-core's own grouped-GEMM experts (recompute moe instead)"),
    (["train.recompute=selective", "train.recompute_modules=[]"], 1, "recomputes nothing"),
    (["train.recompute=selective", "train.recompute_modules=[moe, mlp]"], 1,
     "train.recompute_modules has 'mlp', but the model has no dense layers (model.dense_layers=0), so it would save "
     "nothing: drop it"),
    (["train.recompute=selective", "train.recompute_modules=[shared_experts]"], 1,
     "train.recompute_modules has 'shared_experts', but the model has no shared experts"),
    (["train.recompute_layers=2"], 1, "train.recompute_layers=2 applies to train.recompute=full only"),
    (["train.recompute=full", "train.recompute_layers=5"], 1, "train.recompute_layers=5 must lie in [0, model.num_layers=4]"),
    (["train.recompute=full", "train.recompute_layers=1", "model.mtp_layers=1"], 1,
     "megatron-core recomputes multi-token-prediction layers only when every layer is recomputed"),
    (["train.profile_steps=[3, 2]"], 1, "train.profile_steps=[3, 2] must be [first, last] with 1 <= first <= last"),
    (["train.skip_batches=[5-x]"], 1, "train.skip_batches has '5-x': give steps as FIRST-LAST or STEP"),
    (["train.skip_batches=[9-5]"], 1, "train.skip_batches has 9-5: a range of steps FIRST-LAST with 1 <= FIRST <= LAST"),
    (["train.skip_batches=[150-200]"], 1, "LAST < train.max_steps=200"),
    (["data.tokenizer=t", "data.stages=[{path: [a], steps: 100}, {path: [b], steps: 100}]",
      "train.skip_batches=[90-110, 150]"], 1, "train.skip_batches has 90-110, which holds the last step of a stage"),
    (["moe.variant=sdmoe", "parallel.expert_tensor=2"], 2,
     "moe.variant=sdmoe shards the common matrices with the experts only when parallel.expert_tensor equals"),
    # values that divided by zero, or trained to NaN, before they were checked
    (["run.dir="], 1, "run.dir is empty (an unset shell variable?): give the run directory"),
    (["parallel.tensor=0"], 1, "parallel.tensor=0 must be at least 1"),
    (["model.kv_channels=0"], 1, "model.kv_channels=0 must be at least 1"),
    (["model.make_vocab_size_divisible_by=0"], 1, "model.make_vocab_size_divisible_by=0 must be at least 1"),
    (["model.rotary_base=0"], 1, "model.rotary_base=0 must be at least 1"),
    (["train.lr=inf"], 1, "train.lr=inf must be a finite number, not negative"),
    (["train.lr=nan"], 1, "train.lr=nan must be a finite number, not negative"),
    (["train.adam_eps=0"], 1, "train.adam_eps=0.0 must be positive (0 divides by zero)"),
    (["model.norm_epsilon=-1"], 1, "model.norm_epsilon=-1.0 must be a finite number, not negative"),
    (["model.init_method_std=0"], 1, "model.init_method_std=0.0 must be positive"),
    (["train.weight_decay=-1"], 1, "train.weight_decay=-1.0 must not be negative"),
    (["train.adam_betas=[1.5, 2]"], 1, "train.adam_betas=[1.5, 2] must be two numbers in [0, 1)"),
    (["train.adam_betas=[a, b]"], 1, "train.adam_betas=['a', 'b'] must be two numbers in [0, 1)"),
    (["train.seed=-1"], 1, "train.seed=-1 must lie in [0, 2**32 - 1]"),
    (["data.split=0,0,0"], 1, "data.split='0,0,0' is not of the form train,validation,test with a positive train"),
    # infinite values trained to NaN, or crashed in megatron-core (capacity)
    (["moe.routed_scaling_factor=.inf"], 1, "moe.routed_scaling_factor=inf must be a finite number: give one"),
    (["train.weight_decay=inf"], 1, "train.weight_decay=inf must be a finite number"),
    (["moe.capacity_factor=.inf"], 1, "moe.capacity_factor=inf must be a finite number"),
    (["moe.aux_loss_coeff=nan"], 1, "moe.aux_loss_coeff=nan must not be negative"),
    (["smoothing.threshold=nan"], 1, "smoothing.threshold=nan must be a finite number"),
    (["sdmoe.oversample=-100"], 1, "sdmoe.oversample=-100 must not be negative"),
    (["sdmoe.power_iterations=-1"], 1, "sdmoe.power_iterations=-1 must not be negative"),
    # a complement of round-off only: the unique parts could never train
    (["moe.variant=sdmoe", "sdmoe.rank=128"], 1, "sdmoe.rank=128 leaves the unique parts no direction to train in"),
    # an odd head width crashed in RoPE at the first forward pass
    (["model.kv_channels=33"], 1, "each attention head is 33 wide (model.kv_channels, by default model.hidden_size / "
                                  "model.num_attention_heads), but RoPE rotates pairs of dimensions: make it even"),
    (["model.hidden_size=130", "model.num_attention_heads=2", "model.num_query_groups=1"], 1,
     "each attention head is 65 wide"),
    (["model.preset=deepseek", "model.attention=mla", "model.mla.qk_rope_head_dim=3"], 1,
     "model.mla.qk_rope_head_dim=3 must be even (RoPE rotates pairs of dimensions)"),
    # one expert per router: the diagnostics' comparisons were NaN
    (["moe.num_experts=1", "moe.topk=1", "moe.diag_interval=2"], 1,
     "moe.diag_interval compares experts, but each router has 1: give it 2 or more, or set moe.diag_interval=0"),
    # a trace past the last step was never written; True was step 1
    (["train.max_steps=4", "train.profile_steps=[5, 10]"], 1,
     "train.profile_steps=[5, 10] must be [first, last] with 1 <= first <= last <= train.max_steps=4, or empty"),
    (["train.profile_steps=[true, true]"], 1, "train.profile_steps=[True, True] must be [first, last]"),
    (["train.profile_steps=[2, 3]", "train.skip_batches=[1-3]"], 1,
     "train.profile_steps=[2, 3] lie in train.skip_batches, where no step trains: profile steps that train"),
    # "3-" was read as step 3
    (["train.skip_batches=[3-]"], 1, "train.skip_batches has '3-': give steps as FIRST-LAST or STEP"),
    # no projection decoupled trained the topk baseline under the sdmoe name
    (["moe.variant=sdmoe", "sdmoe.projections=[]"], 1, "sdmoe.projections=[]: choose from gate, up, down (none"),
    (["data.tokenizer=/t", "data.stages=[{name: a, path: [/a], steps: 100, test_path: [/b], valid_path: [/b]}, "
      "{name: b, path: [/b], steps: 100}]"], 1, "data.stages[0].test_path: the test set is evaluated once"),
    (["data.tokenizer=/t", "data.stages=[{name: a, path: [/a], steps: 200}]", "data.valid_path=[/b]"], 1,
     "data.valid_path and data.test_path apply to data.path: with data.stages give each stage its own"),
    # YAML 1.1 reads an unquoted 98:2:0 as the number 352920, which would have trained on every document
    (["data.split=98:2:0"], 1, "data.split='98:2:0' is not of the form train,validation,test"),
])
def test_validation_errors(overrides, world, message):
    cfg = load_config(CONFIG, overrides)
    with pytest.raises(UserError, match=re.escape(message)):
        validate(cfg, world)


@pytest.mark.parametrize("overrides, notes", [
    (["sdmoe.rank=4", "sdmoe.project_updates=true"],
     ["sdmoe.project_updates=True, sdmoe.rank=4 do nothing without moe.variant=sdmoe or headwise_sdmoe"]),
    (["moe.variant=headwise", "sdmoe.rank=4", "headwise.heads=2"],
     ["sdmoe.rank=4 does nothing without moe.variant=sdmoe or headwise_sdmoe"]),
    (["moe.variant=sdmoe", "headwise.bank=shared"],
     ["headwise.bank=shared does nothing without moe.variant=headwise or headwise_sdmoe"]),
    (["model.yarn.factor=4"], ["model.yarn.factor=4.0 does nothing without model.rope_scaling=yarn"]),
    (["model.mla.kv_lora_rank=64"], ["model.mla.kv_lora_rank=64 does nothing without model.attention=mla"]),
    (["moe.token_drop_policy=position"],
     ["moe.token_drop_policy=position does nothing without moe.capacity_factor set (routing is dropless)"]),
    (["moe.diag_rank=4", "smoothing.threshold=3", "train.decay_fraction=0.5"],
     ["moe.diag_rank=4 does nothing without moe.diag_interval > 0",
      "smoothing.threshold=3.0 does nothing without smoothing.enabled=true",
      "train.decay_fraction=0.5 does nothing without train.lr_schedule=wsd"]),
    (["train.lr_schedule=constant", "train.min_lr_ratio=0.5", "moe.aux_loss_coeff=0", "moe.aux_loss_type=sequence"],
     ["moe.aux_loss_type=sequence does nothing without moe.aux_loss_coeff > 0",
      "train.min_lr_ratio=0.5 does nothing without train.lr_schedule=cosine or wsd"]),
    (["model.mtp_loss_coeff=0.3", "train.recompute_modules=[shared_experts]"],
     ["model.mtp_loss_coeff=0.3 does nothing without model.mtp_layers > 0",
      "train.recompute_modules=['shared_experts'] does nothing without train.recompute=selective"]),
    # switched on, or left at their defaults: nothing to note
    (["moe.variant=headwise_sdmoe", "sdmoe.rank=4", "headwise.heads=2", "model.rope_scaling=yarn",
      "model.yarn.factor=4", "moe.capacity_factor=1.5", "moe.token_drop_policy=position"], []),
    (["moe.variant=topk", "sdmoe.rank=8", "train.lr_schedule=constant"], []),
])
def test_settings_of_a_feature_that_is_off_are_noted(overrides, notes):
    """Accepted (an ablation switches a feature off by one override), but noted at start by name."""
    cfg = load_config(CONFIG, overrides)
    validate(cfg, 1)
    assert idle_settings(cfg) == [f"note: {note}" for note in notes]


def test_default_config_is_valid_at_every_tested_layout():
    for overrides, world in [([], 1), (["parallel.expert=2"], 2), (["parallel.tensor=2"], 2),
                             (["parallel.expert=2", "parallel.zero_stage=2"], 4), (["parallel.expert=4"], 4)]:
        validate(load_config(CONFIG, overrides + ["train.micro_batch_size=4"]), world)


@pytest.mark.parametrize("args, world, message", [
    (["train.lrr=1"], "1", "error: unknown config key train.lrr; did you mean train.lr?"),
    (["parallel.expert=4"], "2", "error: world size 2 is not divisible by parallel.expert"),
    (["parallel.zero_stage=3", "parallel.expert=2"], "2", "error: parallel.zero_stage=3 is not supported"),
])
def test_cli_bad_input_exits_2_with_one_line(args, world, message, tmp_path):
    run_dir = tmp_path / "run"
    proc = python_m("megatron_sdmoe.train", CONFIG, f"run.dir={run_dir}", *args, env=run_env(WORLD_SIZE=world, RANK="0"))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), proc.stderr
    assert not run_dir.exists()  # nothing half-written


def test_yaml_merge_keys(tmp_path):
    """Stages that share settings through an anchor and merge keys (`<<: *first`), one of them set again."""
    (tmp_path / "stages.yaml").write_text("data:\n  tokenizer: tok\n  stages:\n"
                                          "    - &first {path: [a], steps: 100}\n    - <<: *first\n      path: [b]\n")
    stages = load_config(tmp_path / "stages.yaml").data.stages
    assert [(stage.path, stage.steps) for stage in stages] == [([os.path.abspath("a")], 100), ([os.path.abspath("b")], 100)]


@pytest.mark.parametrize("content, message", [
    (b"\xff\xfe\x00 not text", "is not UTF-8 text: pass a YAML file (see configs/)"),
    (b"1: 2\n", "config key 1 is not a name: keys are section and setting names (see configs/)"),
    (b"train:\n  lr: 1\n  lr: 2\n", "is not valid YAML (key 'lr' appears twice): fix the syntax"),
    (b"# nothing but a comment\n", "is empty: pass a config with its sections (see configs/)"),
    (b"", "is empty: pass a config with its sections (see configs/)"),
])
def test_config_files_that_are_not_configs(content, message, tmp_path):
    (tmp_path / "bad.yaml").write_bytes(content)
    with pytest.raises(UserError, match=re.escape(message)):
        load_config(tmp_path / "bad.yaml")
    with pytest.raises(UserError, match="is a directory: pass the path of a YAML file"):
        load_config(tmp_path)
    with pytest.raises(UserError, match="/dev/null is not a file: pass the path of a YAML file"):
        load_config("/dev/null")


@pytest.mark.parametrize("prog, args, message", [
    ("megatron_sdmoe.evaluate", ["RUN", "--step", "abc"], "error: argument --step: invalid int value: 'abc': see "
                                                          "sdmoe-eval --help"),
    ("megatron_sdmoe.evaluate", ["RUN", "--routes-top", "-3"], "error: argument --routes-top: '-3' is not a positive "
                                                               "integer: see sdmoe-eval --help"),
    ("megatron_sdmoe.checkpoints", ["rollback", "RUN", "step_2"], "error: argument step: invalid int value: "
                                                                  "'step_2': see sdmoe-checkpoints rollback --help"),
    ("megatron_sdmoe.estimate", [CONFIG, "--gpus", "1", "--gpu-memory-gib", "nan"],
     "error: argument --gpu-memory-gib: 'nan' is not a positive number: see sdmoe-estimate --help"),
    ("megatron_sdmoe.convert.cli", [], "error: the following arguments are required: command: see sdmoe-convert "
                                       "--help"),
])
def test_command_line_errors_are_one_line(prog, args, message, tmp_path):
    """argparse's own errors too: one line naming the problem and --help, exit 2."""
    proc = python_m(prog, *[str(tmp_path) if a == "RUN" else a for a in args])
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [message], proc.stderr


def test_cli_missing_config_file(tmp_path):
    proc = python_m("megatron_sdmoe.train", tmp_path / "nope.yaml")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: config file {tmp_path / 'nope.yaml'} not found: pass the "
                                                "path of a YAML file (see configs/)"]


def _console_scripts():
    with open(REPO / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["project"]["scripts"].items()


@pytest.mark.parametrize("prog, target", _console_scripts())
def test_every_command_help_shows_an_example(prog, target, capsys):
    module, function = target.split(":")
    with pytest.raises(SystemExit) as exit_info:
        getattr(importlib.import_module(module), function)(["--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    assert re.search(rf"^ +{prog} \S", help_text, re.MULTILINE), f"{prog} --help has no example line"


def config_keys(section, prefix: str = ""):
    """Every dotted key of a config section, nested sections flattened (a list of sections is one key)."""
    for f in dataclasses.fields(section):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            yield from config_keys(type(default), f"{prefix}{f.name}.")
        else:
            yield prefix + f.name


def test_readme_documents_every_config_key():
    readme = (REPO / "README.md").read_text()
    reference = readme[readme.index("## Config reference"):]
    assert [key for key in config_keys(Config) if f"`{key}`" not in reference] == []
