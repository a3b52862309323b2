"""Parametric singularity smoothing (smoothing.enabled): the clipping against numpy's SVD, the
subspaces it keeps (SD-MoE's), and through the real entry point: the same losses at TP2 and EP2 as
in one process, each weight matrix smoothed whole on DeepSpeed's fp32 master weights (a flat top
of its spectrum, also when TP2 holds it in shards), and an exact resume across a spike."""
import json

import numpy as np
import pytest
import torch

from conftest import REPO, launch, metrics
from megatron_sdmoe.moe.sdmoe import complement
from megatron_sdmoe.training.smoothing import clip_top_singular_values

EVERY_STEP = ["smoothing.enabled=true", "smoothing.threshold=0.5"]  # each step after the first is a "spike"
WORKER = "tests.workers.smoothing_masters"


def reference(matrix: np.ndarray) -> np.ndarray:
    """docs/methods.md section 5 in numpy: the top k = floor(SR) singular values clipped to the (k+1)-th."""
    u, s, vh = np.linalg.svd(matrix.astype(np.float64), full_matrices=False)
    k = int(np.floor((s ** 2).sum() / s[0] ** 2))
    return (u * np.minimum(s, s[k])) @ vh


def test_clipping_matches_numpy():
    torch.manual_seed(0)
    matrices = torch.randn(3, 48, 80) @ torch.diag(torch.linspace(4.0, 0.1, 80))  # a decaying spectrum
    matrices[1, :, :2] *= 30  # one dominant direction: SR near 1
    got = clip_top_singular_values(matrices)
    for matrix, smoothed in zip(matrices, got):
        want = reference(matrix.numpy())
        assert np.abs(smoothed.numpy() - want).max() < 1e-4 * np.abs(want).max()
        s = np.linalg.svd(smoothed.numpy(), compute_uv=False)
        assert s[1] / s[0] > 1 - 1e-5  # the top is flat


def test_clipping_keeps_subspaces():
    torch.manual_seed(1)
    q, _ = torch.linalg.qr(torch.randn(64, 4))
    v, _ = torch.linalg.qr(torch.randn(32, 4))
    # a unique matrix in the two-sided complement of (Q, V) stays there
    unique = clip_top_singular_values(complement(torch.randn(64, 32), q, v))
    assert (unique - complement(unique, q, v)).abs().max() < 1e-5
    # a common matrix of rank 4 with equal singular values (SR = 4 = its rank) is left as it is
    common = 3.0 * q @ v.T
    assert torch.allclose(clip_top_singular_values(common), common, atol=1e-5)


def spectra(proc) -> dict:
    return json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("SPECTRA "))[8:])


def test_layouts_smooth_the_same_model(tmp_path):
    runs = {"one": (1, []), "TP2": (2, ["parallel.tensor=2"]), "EP2": (2, ["parallel.expert=2"])}
    results, seen = {}, {}
    for name, (nproc, layout) in runs.items():
        seen[name] = spectra(launch(tmp_path / name, nproc, *EVERY_STEP, *layout, module=WORKER))
        results[name] = metrics(tmp_path / name)
    one = results["one"]
    assert [row["smoothed_steps"] for row in one] == [0, 1, 2, 3]
    for name in ("TP2", "EP2"):
        for a, b in zip(one, results[name], strict=True):
            assert b["loss"] == pytest.approx(a["loss"], abs=2e-5), name
            assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4), name
            assert b["smoothed_steps"] == a["smoothed_steps"]
    # The last step smoothed: every matrix's fp32 master has a flat top (TP2: smoothed whole, not
    # shard by shard), and the model's weights are the masters; without smoothing no matrix has.
    for name in runs:
        assert seen[name]["min_top_ratio"] > 1 - 1e-4 and seen[name]["max_master_difference"] == 0, (name, seen[name])
    assert spectra(launch(tmp_path / "plain", 1, module=WORKER))["max_top_ratio"] < 0.999


def test_deepseek_at_tp2_smooths_the_same_model(tmp_path):
    """MLA's latent projections, shared experts, a dense first layer and MTP layers, split by TP2."""
    config = REPO / "configs" / "tiny-deepseek.yaml"
    one, tp2 = (spectra(launch(tmp_path / name, nproc, *EVERY_STEP, *layout, module=WORKER, config=config))
                for name, nproc, layout in (("one", 1, []), ("TP2", 2, ["parallel.tensor=2"])))
    for a, b in zip(metrics(tmp_path / "one"), metrics(tmp_path / "TP2"), strict=True):
        assert b["loss"] == pytest.approx(a["loss"], abs=2e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
    assert metrics(tmp_path / "TP2")[-1]["smoothed_steps"] == 3
    assert min(one["min_top_ratio"], tp2["min_top_ratio"]) > 1 - 1e-4


@pytest.mark.parametrize("zero_stage", [1, 2])
def test_bf16_smooths_the_fp32_masters(zero_stage, tmp_path):
    """bf16: ZeRO-1 runs DeepSpeed's BF16_Optimizer, ZeRO-2 its ZeRO optimizer; both keep fp32 masters."""
    seen = spectra(launch(tmp_path, 1, *EVERY_STEP, "train.precision=bf16", f"parallel.zero_stage={zero_stage}",
                          module=WORKER))
    assert seen["min_top_ratio"] > 1 - 1e-4 and 0 < seen["max_master_difference"] < 1e-2, seen  # bf16 rounding


@pytest.mark.parametrize("run, stop, check", [
    # default threshold: the running mean builds up over steps 1-4 and a spike after the restart
    # is smoothed as in the run that did not stop (the mean is saved with the checkpoint)
    (["smoothing.enabled=true", "train.max_steps=8"], 4, lambda rows: rows[3]["smoothed_steps"] == 0 < rows[-1][
        "smoothed_steps"]),
    # smoothed at the stop: the checkpoint's fp32 master weights (what a resumed run starts from) are smoothed
    ([*EVERY_STEP, "train.max_steps=4"], 2, lambda rows: rows[1]["smoothed_steps"] == 1),
], ids=["spike after the restart", "smoothed at the stop"])
def test_resume_is_exact(run, stop, check, tmp_path):
    launch(tmp_path / "straight", 1, *run)
    straight = metrics(tmp_path / "straight")
    assert check(straight)
    launch(tmp_path / "resumed", 1, *run, f"train.exit_interval={stop}")
    launch(tmp_path / "resumed", 1, *run)
    for a, b in zip(straight[stop:], metrics(tmp_path / "resumed")[stop:], strict=True):
        assert (b["loss"], b["grad_norm"], b["smoothed_steps"], b["grad_norm_mean"]) == \
            (a["loss"], a["grad_norm"], a["smoothed_steps"], a["grad_norm_mean"])


def test_spike_rule_against_the_logged_norms(tmp_path):
    """docs/methods.md section 5 recomputed from the run's own gradient norms: a spike is a norm
    above threshold x the bias-corrected EMA of the earlier norms that were not spikes."""
    threshold, decay = 2.0, 0.5  # spikes among 8 steps, and a mean that moves
    launch(tmp_path, 1, "smoothing.enabled=true", f"smoothing.threshold={threshold}", f"smoothing.ema_decay={decay}",
           "train.max_steps=8")
    rows = metrics(tmp_path)
    ema, steps, smoothed = 0.0, 0, 0
    for row in rows:
        mean = ema / (1 - decay ** steps) if steps else float("nan")
        if row["grad_norm"] > threshold * mean:
            smoothed += 1
        else:
            ema, steps = decay * ema + (1 - decay) * row["grad_norm"], steps + 1
        assert row["smoothed_steps"] == smoothed
        assert row["grad_norm_mean"] == pytest.approx(ema / (1 - decay ** steps), rel=1e-12)
    assert 0 < smoothed < len(rows) - 1, [row["grad_norm"] for row in rows]  # both branches taken
