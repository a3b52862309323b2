"""Initial weights: each weight's values come from its own generator, so they do not depend on
how many threads draw them (the parallel layouts' independence is test_parallel_parity's)."""
import pytest
import torch

from conftest import REPO, SMALL
from megatron_sdmoe.config import load_config
from megatron_sdmoe.models import build_model
from megatron_sdmoe.models import init as weight_init

VOCAB = 512


def initial_weights(monkeypatch, threads: int, *overrides: str) -> dict[str, torch.Tensor]:
    monkeypatch.setattr(weight_init, "cores_per_local_rank", lambda: threads)
    cfg = load_config(REPO / "configs" / "tiny-deepseek.yaml", [*SMALL, *overrides])
    return {name: p.detach().clone() for name, p in build_model(cfg, VOCAB, torch.float32).named_parameters()}


@pytest.mark.parametrize("variant", ["topk", "sdmoe"])
def test_initial_weights_do_not_depend_on_the_drawing_threads(single_process_groups, monkeypatch, variant):
    serial = initial_weights(monkeypatch, 1, f"moe.variant={variant}")
    threaded = initial_weights(monkeypatch, 3, f"moe.variant={variant}")
    assert serial.keys() == threaded.keys()
    for name in serial:
        assert torch.equal(serial[name], threaded[name]), name
    other_seed = initial_weights(monkeypatch, 3, f"moe.variant={variant}", "train.seed=7")
    assert not torch.equal(other_seed["embedding.word_embeddings.weight"], serial["embedding.word_embeddings.weight"])


def test_weights_are_drawn_at_the_configured_std(single_process_groups):
    """model.init_method_std for every weight matrix, divided by sqrt(2 x layers) for the output
    projections (megatron-core's scaled_init_method_normal); norm weights 1."""
    std, layers = 0.05, 3
    cfg = load_config(REPO / "configs" / "tiny-deepseek.yaml", [*SMALL, f"model.init_method_std={std}",
                                                                 f"model.num_layers={layers}"])
    model = build_model(cfg, VOCAB, torch.float32)
    checked = 0
    for name, param in model.named_parameters():
        if param.dim() == 1:
            assert torch.all(param == 1.0), name
        elif param.numel() >= 4096:  # enough values for a sample std within 5%
            output = name.split(".")[-2 if name.endswith(".weight") else -1] in ("linear_proj", "linear_fc2")
            want = std / (2 * layers) ** 0.5 if output else std
            assert param.std().item() == pytest.approx(want, rel=0.05), name
            assert abs(param.mean().item()) < 0.1 * want, name
            checked += 1
    assert checked > 10
