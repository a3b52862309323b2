"""GPU path (NCCL, bf16, no CPU compatibility layer). Runs only where CUDA is present; results
recorded in the README with the command that produced them."""
import pytest
import torch

from conftest import CONFIG, REPO, launch, metrics

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_bf16_training_learns_on_gpu(tmp_path):
    launch(tmp_path, 1, "train.max_steps=30", "train.lr=0.003", "train.warmup_steps=5")
    rows = metrics(tmp_path)
    assert len(rows) == 30
    assert sum(r["loss"] for r in rows[-5:]) / 5 < rows[0]["loss"] - 0.5


YARN = ["model.rope_scaling=yarn", "model.yarn.factor=4", "model.yarn.original_max_position_embeddings=32"]


@pytest.mark.parametrize("config, variant", [
    (CONFIG, []), (CONFIG, ["moe.variant=sdmoe", "sdmoe.refresh_interval=2"]),
    (CONFIG, ["smoothing.enabled=true", "smoothing.threshold=0.5"]), (CONFIG, YARN),
    (REPO / "configs" / "tiny-deepseek.yaml", [*YARN, "model.yarn.mscale=0.707", "model.yarn.mscale_all_dim=0.707"])],
    ids=["topk", "sdmoe", "smoothing every step", "YaRN (GQA)", "DeepSeek-like: MLA with YaRN, MTP, bias balancing"])
def test_fp32_on_gpu_matches_cpu(tmp_path, config, variant):
    launch(tmp_path / "gpu", 1, "train.precision=fp32", *variant, config=config)
    launch(tmp_path / "cpu", 1, *variant, env={"CUDA_VISIBLE_DEVICES": ""}, config=config)
    for gpu, cpu in zip(metrics(tmp_path / "gpu"), metrics(tmp_path / "cpu"), strict=True):
        assert gpu["loss"] == pytest.approx(cpu["loss"], abs=1e-3)


@pytest.mark.parametrize("variant", [[], ["moe.variant=sdmoe", "sdmoe.refresh_interval=2"]], ids=["topk", "sdmoe"])
def test_recompute_on_gpu_same_losses_less_memory(tmp_path, variant):
    """On a GPU, recomputation saves and restores the real CUDA generator's state (the CPU runs a
    stand-in): fp32 losses equal the run that keeps its activations, at a lower peak memory
    (sdmoe-estimate: 0.68x of the weights, optimizer states and activations here)."""
    sizes = ["train.precision=fp32", "model.num_layers=8", "data.seq_length=512", "train.micro_batch_size=4",
             "train.global_batch_size=8", *variant]
    launch(tmp_path / "kept", 1, *sizes)
    launch(tmp_path / "recomputed", 1, *sizes, "train.recompute=full")
    kept, recomputed = metrics(tmp_path / "kept"), metrics(tmp_path / "recomputed")
    for k, r in zip(kept, recomputed, strict=True):
        assert r["loss"] == pytest.approx(k["loss"], rel=1e-5)
    assert recomputed[-1]["max_memory_gib"] < 0.85 * kept[-1]["max_memory_gib"]
