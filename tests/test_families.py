"""Every model family trains from its tiny config through the real entry point, and its loss does
not depend on the parallel layout (shared experts and their gate included)."""
import pytest

from conftest import REPO, launch, metrics

FAMILIES = {"qwen2_moe": REPO / "configs" / "tiny-qwen2-moe.yaml", "qwen3_moe": REPO / "configs" / "tiny-qwen3-moe.yaml"}
# SMALL (conftest) shrinks the routed experts; shrink the shared expert with them
SHRINK = {"qwen2_moe": ["moe.shared_expert_ffn_hidden_size=128"], "qwen3_moe": []}


@pytest.mark.parametrize("family", FAMILIES)
def test_trains_from_its_tiny_config(family, tmp_path):
    launch(tmp_path, 1, "train.max_steps=30", "train.lr=0.003", "train.warmup_steps=5", "train.log_interval=5",
           *SHRINK[family], config=FAMILIES[family])
    rows = metrics(tmp_path)
    assert rows[-1]["step"] == 30
    assert rows[-1]["loss"] < rows[0]["loss"] - 1.0


def test_qwen2_moe_layout_parity(tmp_path):
    runs = {"one process": (1, []), "EP2": (2, ["parallel.expert=2"]), "TP2": (2, ["parallel.tensor=2"])}
    results = {}
    for name, (nproc, overrides) in runs.items():
        launch(tmp_path / name.replace(" ", "_"), nproc, *SHRINK["qwen2_moe"], *overrides, config=FAMILIES["qwen2_moe"])
        results[name] = metrics(tmp_path / name.replace(" ", "_"))
    for name in ("EP2", "TP2"):
        for got, want in zip(results[name], results["one process"]):
            assert got["loss"] == pytest.approx(want["loss"], abs=2e-5), (name, got["step"])
            assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-4), (name, got["step"])
