"""GPU path (NCCL, bf16, no CPU compatibility layer). Runs only where CUDA is present; results
recorded in the README with the command that produced them."""
import pytest
import torch

from conftest import launch, metrics

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_bf16_training_learns_on_gpu(tmp_path):
    launch(tmp_path, 1, "train.max_steps=30", "train.lr=0.003", "train.warmup_steps=5")
    rows = metrics(tmp_path)
    assert len(rows) == 30
    assert sum(r["loss"] for r in rows[-5:]) / 5 < rows[0]["loss"] - 0.5


@pytest.mark.parametrize("variant", [[], ["moe.variant=sdmoe", "sdmoe.refresh_interval=2"]], ids=["topk", "sdmoe"])
def test_fp32_on_gpu_matches_cpu(tmp_path, variant):
    launch(tmp_path / "gpu", 1, "train.precision=fp32", *variant)
    launch(tmp_path / "cpu", 1, *variant, env={"CUDA_VISIBLE_DEVICES": ""})
    for gpu, cpu in zip(metrics(tmp_path / "gpu"), metrics(tmp_path / "cpu")):
        assert gpu["loss"] == pytest.approx(cpu["loss"], abs=1e-3)
