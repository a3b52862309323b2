"""sdmoe-convert upcycle: a dense transformers Qwen3 model (tied embeddings, as the small Qwen3
models have) imported as a MoE whose experts copy its MLPs starts at the dense model's validation
loss on the same samples (transformers' own forward), with top-k and SD-MoE experts and at EP2;
its experts then train apart; bad input is one line and nothing written."""
import pytest
import torch

from conftest import launch, metrics, rank_file, run_command, sample_tokenizer

from megatron_sdmoe.convert.weights import WeightDirectory
from test_convert import IMPORTED, hf_validation_loss, load_exported

CONVERT = "megatron_sdmoe.convert.cli"


def dense_qwen3(out_dir, tie: bool = True):
    """A transformers-initialised dense Qwen3 model in the sample corpus' vocabulary, saved."""
    import transformers

    config = transformers.Qwen3Config(vocab_size=4096, hidden_size=64, intermediate_size=32, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                      tie_word_embeddings=tie, architectures=["Qwen3ForCausalLM"],
                                      initializer_range=0.2)  # weights large enough that each MLP counts
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(out_dir)


@pytest.fixture(scope="module")
def upcycled(tmp_path_factory):
    root = tmp_path_factory.mktemp("upcycle")
    dense_qwen3(root / "dense")
    proc = run_command(CONVERT, "upcycle", root / "dense", root / "moe", "moe.num_experts=4", "moe.topk=2",
                       "data.seq_length=64", sample_tokenizer())
    assert proc.returncode == 0, proc.stderr
    assert "(Qwen3ForCausalLM upcycled: 4 experts, top-2, 2 layers)" in proc.stdout
    return root


@pytest.mark.parametrize("variant, nproc, layout", [("topk", 1, []), ("sdmoe", 1, []), ("topk", 2, ["parallel.expert=2"])],
                         ids=["topk", "sdmoe", "topk-EP2"])
def test_the_upcycled_model_starts_as_the_dense_model(variant, nproc, layout, upcycled, tmp_path):
    """Its logits on fixed tokens and its validation loss equal transformers' dense model's."""
    from tests.workers.logits import TOKENS

    run, config, settings = tmp_path / "run", upcycled / "moe" / "config.yaml", [f"moe.variant={variant}", *layout]
    proc = launch(run, nproc, *IMPORTED, "train.eval_interval=1", *settings, config=config)
    assert "drawn fresh" not in proc.stdout  # every weight comes from the files
    launch(run, nproc, *IMPORTED, *settings, str(tmp_path / "ours.pt"), module="tests.workers.logits", config=config)
    with torch.no_grad():
        theirs = load_exported(upcycled / "dense")(TOKENS).logits
    assert (torch.load(tmp_path / "ours.pt") - theirs).abs().max().item() <= 1e-4
    assert metrics(run)[0]["val_loss"] == pytest.approx(hf_validation_loss(upcycled / "dense", run), abs=1e-4)


def test_the_copies_train_apart(upcycled, tmp_path):
    """Every expert starts as the same MLP; routed different tokens, they differ after training.
    A shared expert added to the imported model is drawn fresh, and the start says so."""
    run = tmp_path / "run"
    proc = launch(run, 1, "moe.ffn_hidden_size=32", "train.max_steps=3", "moe.shared_expert_ffn_hidden_size=32",
                  "train.lr=1e-3", "train.save_interval=3", config=upcycled / "moe" / "config.yaml")
    assert (f"model.init_from: drawn fresh, as {upcycled / 'moe' / 'weights'} does not hold them: "
            "decoder.layers.*.mlp.shared_experts (4 weights)\n") in proc.stdout
    model = rank_file(run, 3)["model"]
    imported = WeightDirectory(upcycled / "moe" / "weights")
    for layer in range(2):
        name = f"decoder.layers.{layer}.mlp.experts.linear_fc1"
        experts = imported.tensor(name)
        assert all(torch.equal(expert, experts[0]) for expert in experts)
        trained = model[name]
        assert not torch.equal(trained[0], trained[1])


def test_an_fp8_dense_model_upcycles_dequantised(single_process_groups, tmp_path):
    """A dense model in the block-quantised FP8 format of the -FP8 releases: the upcycled model's
    logits are those of the dense model transformers dequantises from the same files."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from megatron_sdmoe.config import load_config
    from megatron_sdmoe.models import build_model
    from test_convert_released import save_fp8

    dense_qwen3(tmp_path / "dense")
    save_fp8(load_file(tmp_path / "dense" / "model.safetensors"), tmp_path / "dense", tmp_path / "fp8")
    proc = run_command(CONVERT, "upcycle", tmp_path / "fp8", tmp_path / "moe", "moe.num_experts=4", "moe.topk=2",
                       sample_tokenizer())
    assert proc.returncode == 0, proc.stderr
    assert "(Qwen3ForCausalLM upcycled: 4 experts, top-2, 2 layers, FP8 dequantised to torch.float32)" in proc.stdout
    ours = build_model(load_config(tmp_path / "moe" / "config.yaml"), 4096, torch.float32).eval()
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "fp8", dtype=torch.float32).eval()
    tokens = torch.randint(0, 4096, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        difference = ours(tokens, torch.arange(32).expand_as(tokens), None) - theirs(tokens).logits
    assert difference.abs().max().item() <= 1e-4


@pytest.mark.parametrize("case, message", [
    ("moe", "upcycle reads a dense Qwen3ForCausalLM, not architectures=['Qwen3MoeForCausalLM']: import MoE models "
            "with sdmoe-convert from-hf"),
    ("topk", "moe.topk=5 with moe.num_experts=4: choose 1 <= topk <= experts"),
    ("headwise", "moe.variant=headwise experts take d/H-wide head slices, so they cannot copy the dense MLP: upcycle "
                 "with moe.variant=topk or sdmoe"),
    ("resized", "overrides would describe another model than the weights (moe.ffn_hidden_size: 32 -> 64, "
                "moe.shared_expert_ffn_hidden_size: 0 -> 128): drop them (the model's sizes come from its config.json)"),
])
def test_bad_input_exits_2_with_one_line(case, message, upcycled, tmp_path):
    from test_convert import hf_model_config, save_hf_model

    source = upcycled / "dense"
    if case == "moe":
        source = tmp_path / "moe"
        save_hf_model(hf_model_config("qwen3_moe", vocab_size=4096), source)
    proc = run_command(CONVERT, "upcycle", source, tmp_path / "out", "moe.num_experts=4",
                       *{"topk": ["moe.topk=5"], "headwise": ["moe.variant=headwise"],
                         "resized": ["moe.ffn_hidden_size=64", "moe.shared_expert_ffn_hidden_size=128"]}.get(case, []))
    assert proc.returncode == 2 and proc.stderr.strip() == f"error: {message}", proc.stderr
    assert not (tmp_path / "out").exists()
