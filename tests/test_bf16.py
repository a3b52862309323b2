"""bf16 training (the GPU default) on the CPU: gradients add up over micro-batches in fp32, and the
parallel layouts train the same model (ZeRO-1 runs on DeepSpeed's BF16_Optimizer, ZeRO-2 on its
ZeRO optimizer with an fp32 gradient partition). Exact resume, re-cut partitions, replicas and
skipped non-finite steps in bf16: test_resume.py, test_zero_replicas.py, test_preemption.py."""
import json

import pytest

from conftest import launch, metrics

BF16 = ["train.precision=bf16"]


@pytest.mark.parametrize("stage", [1, 2])
def test_micro_batch_gradients_add_up_in_fp32(stage, tmp_path):
    """8 micro-batches: the engine's gradient equals the fp32 sum of the micro-batches' bf16
    gradients (DeepSpeed's default bf16 sum is 6e-3 off here)."""
    proc = launch(tmp_path, 1, *BF16, f"parallel.zero_stage={stage}", "train.micro_batch_size=1",
                  module="tests.workers.grad_accumulation")
    line = next(line for line in proc.stdout.splitlines() if line.startswith("ACCUMULATION "))
    result = json.loads(line.removeprefix("ACCUMULATION "))
    assert result["dtype"] == "torch.bfloat16" and result["micro_batches"] == 8
    assert result["max_relative_error"] <= 1e-6


# name: (processes, overrides). Step 1 starts from the same weights: the same loss (TP's
# row-parallel sums round differently in bf16: 4e-5 here) and a gradient norm that shows every
# reduction's scale (1e-4 apart at TP2, 2e-5 at ZeRO-2); later steps drift by the updates' bf16
# round-off (1e-3 at TP2 by step 3).
LAYOUTS = {"DP2 ZeRO-1": (2, []), "EP2 x DP2 ZeRO-1": (4, ["parallel.expert=2"]),
           "EP2 x DP2 ZeRO-2": (4, ["parallel.expert=2", "parallel.zero_stage=2"]),
           "TP2": (2, ["parallel.tensor=2"])}


def test_layouts_train_the_same_model_in_bf16(tmp_path):
    launch(tmp_path / "one", 1, *BF16, "train.max_steps=3")
    want = metrics(tmp_path / "one")
    for name, (nproc, overrides) in LAYOUTS.items():
        launch(tmp_path / name, nproc, *BF16, "train.max_steps=3", *overrides)
        got = metrics(tmp_path / name)
        assert got[0]["loss"] == pytest.approx(want[0]["loss"], abs=1e-4), name
        assert got[0]["grad_norm"] == pytest.approx(want[0]["grad_norm"], rel=1e-3), name
        for g, w in zip(got[1:], want[1:], strict=True):
            assert g["loss"] == pytest.approx(w["loss"], abs=3e-3), (name, g["step"])


def test_an_fp32_run_resumes_in_bf16(tmp_path):
    """A run started in fp32 (`auto` on a CPU) continues in bf16 (`auto` on a GPU): DeepSpeed's ZeRO
    optimizer and BF16_Optimizer cut their fp32 partitions alike, so the masters and Adam moments
    come back in place (one element off moves a loss by 0.1, test_resume.py)."""
    launch(tmp_path / "fp32", 2, "train.max_steps=4")
    launch(tmp_path / "switch", 2, "train.max_steps=4", "train.exit_interval=2")
    proc = launch(tmp_path / "switch", 2, "train.max_steps=4", *BF16)
    assert "resuming from step 2 (loaded in" in proc.stdout
    assert "with changed settings" in proc.stdout and "train.precision" in proc.stdout
    assert "_load_legacy_checkpoint" not in proc.stdout  # DeepSpeed's print, silenced
    for got, want in zip(metrics(tmp_path / "switch")[2:], metrics(tmp_path / "fp32")[2:], strict=True):
        assert got["loss"] == pytest.approx(want["loss"], abs=3e-3), got["step"]
