"""Starting again in the same run directory resumes exactly: 8 steps straight and 4 + 4 give
identical losses for steps 5-8 (model, ZeRO optimizer partitions, LR schedule, RNG, data position).
Resuming with another number of processes (another data-parallel size) continues the same run:
the losses of one run in two layouts agree to round-off (test_parallel_parity.py)."""
import json
import socket
import subprocess

import pytest
import torch

from conftest import REPO, launch, metrics

RUN = ["train.max_steps=8", "train.eval_interval=4"]
LAYOUTS = {"one process": (1, []), "EP2 ZeRO-2": (2, ["parallel.expert=2", "parallel.zero_stage=2"]),
           "bf16 ZeRO-1": (1, ["train.precision=bf16"])}  # DeepSpeed's BF16_Optimizer (training/engine.py)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """8 steps without a stop, per entry of LAYOUTS, run once for the module."""
    runs = {}

    def run(name: str) -> list[dict]:
        if name not in runs:
            run_dir, (nproc, layout) = tmp_path_factory.mktemp("straight"), LAYOUTS[name]
            launch(run_dir, nproc, *RUN, *layout)
            runs[name] = metrics(run_dir)
        return runs[name]
    return run


def stopped_at_4(run_dir, nproc, layout):
    launch(run_dir, nproc, *RUN, *layout, "train.exit_interval=4")
    assert [r["step"] for r in metrics(run_dir)] == [1, 2, 3, 4]
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_00000004"


@pytest.mark.parametrize("name", LAYOUTS)
def test_resume_is_exact(name, straight, tmp_path):
    nproc, layout = LAYOUTS[name]
    stopped_at_4(tmp_path, nproc, layout)
    proc = launch(tmp_path, nproc, *RUN, *layout)
    assert "resuming from step 4" in proc.stdout
    assert_starts_recorded(tmp_path, nproc)
    resumed, reference = metrics(tmp_path)[4:], straight(name)[4:]
    assert [r["step"] for r in resumed] == [r["step"] for r in reference] == [5, 6, 7, 8]
    for got, want in zip(resumed, reference):
        for key in ("loss", "aux_loss", "grad_norm", "lr"):
            assert got[key] == want[key], (got["step"], key)
    assert resumed[-1]["val_loss"] == reference[-1]["val_loss"]


def assert_starts_recorded(run_dir, nproc: int) -> None:
    """starts.jsonl: one line per start, with the step it started from, every rank's host and
    device, and the versions installed (importlib.metadata's, git's commit)."""
    from importlib import metadata

    starts = [json.loads(line) for line in (run_dir / "starts.jsonl").read_text().splitlines()]
    assert [s["start_step"] for s in starts] == [0, 4]
    for start in starts:
        assert start["world_size"] == nproc and start["hosts"] == {socket.gethostname(): nproc}
        assert start["devices"] == {"cpu": nproc} and start["precision"] in ("float32", "bfloat16")
        for package in ("torch", "megatron-core", "deepspeed", "transformers"):
            assert start["versions"][package] == metadata.version(package), package
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True)
        assert start["commit"].removesuffix("+dirty") == head.stdout.strip()


@pytest.mark.parametrize("name, saved, resumed", [("one process", 1, 2), ("EP2 ZeRO-2", 4, 2), ("bf16 ZeRO-1", 1, 2)],
                         ids=["DP1 to DP2", "EP2: DP4 to DP2 (expert DP 2 to 1)", "bf16: DP1 to DP2"])
def test_resume_at_another_data_parallel_size(name, saved, resumed, straight, tmp_path):
    """Against the straight run in LAYOUTS' number of processes. The ZeRO partitions are re-cut: Adam
    moments misplaced by one element move step 6's loss by 0.1. In bf16 the two layouts' losses
    drift apart by the updates' round-off (5e-4 by step 8), as between any two layouts
    (test_bf16.py)."""
    layout = LAYOUTS[name][1]
    stopped_at_4(tmp_path, saved, layout)
    proc = launch(tmp_path, resumed, *RUN, *layout)
    assert "resuming from step 4" in proc.stdout
    assert_continues(metrics(tmp_path), straight(name), bf16="bf16" in name)


def assert_continues(rows: list[dict], reference: list[dict], bf16: bool = False) -> None:
    """Steps 1-8 of a run stopped at 4 and resumed in another layout are the straight run's, to the
    round-off between layouts."""
    assert [r["step"] for r in rows] == [r["step"] for r in reference] == list(range(1, 9))
    loss_tolerance = 3e-3 if bf16 else 2e-5  # fp32: test_parallel_parity.py's
    for got, want in zip(rows, reference):
        assert got["loss"] == pytest.approx(want["loss"], abs=loss_tolerance), got["step"]
        assert got["lr"] == pytest.approx(want["lr"], rel=1e-12)
        if not bf16:
            assert got["aux_loss"] == pytest.approx(want["aux_loss"], abs=2e-4), got["step"]
            assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-4), got["step"]
    assert rows[-1]["val_loss"] == pytest.approx(reference[-1]["val_loss"], abs=loss_tolerance)


# (saved processes, saved layout, resumed processes, resumed layout, model): each model's hard case
RELAID = {
    "qwen3: EP1 to EP2": (1, [], 2, ["parallel.expert=2"], []),
    # MLA, shared experts, the routing bias of auxiliary-loss-free balancing, an MTP layer
    "deepseek: EP2 to TP2": (2, ["parallel.expert=2"], 2, ["parallel.tensor=2"], ["model.mtp_layers=1"]),
    # the bases of the step-3 refresh: at EP2 both ranks hold the layer's one group's, at ETP2 each its rows
    "sdmoe: TP2 ETP2 to EP2": (2, ["parallel.tensor=2", "parallel.expert_tensor=2"], 2, ["parallel.expert=2"],
                               ["moe.variant=sdmoe", "sdmoe.refresh_interval=3"]),
    # per-expert common matrices at their own LR: dense parameters in one process, an expert group at EP2
    "sdmoe per-expert C: EP1 to EP2": (1, [], 2, ["parallel.expert=2"],
                                       ["moe.variant=sdmoe", "sdmoe.common=per_expert", "sdmoe.common_lr_scale=0.5",
                                        "sdmoe.refresh_interval=3"]),
    # TP and expert TP stay: each rank reads only its own TP shard of every tensor
    "sdmoe: TP2 ETP2 to TP2 ETP2 EP2": (2, ["parallel.tensor=2", "parallel.expert_tensor=2"], 4,
                                        ["parallel.tensor=2", "parallel.expert_tensor=2", "parallel.expert=2"],
                                        ["moe.variant=sdmoe", "sdmoe.refresh_interval=3"]),
}


@pytest.mark.parametrize("name", RELAID)
def test_resume_at_another_model_parallel_layout(name, tmp_path):
    """Another TP / EP / expert-TP: every tensor, its fp32 master and Adam moments (and SD-MoE's
    bases) are assembled whole and re-cut, against the straight run in the saved layout."""
    saved, saved_layout, resumed, resumed_layout, model = RELAID[name]
    config = {"config": REPO / "configs" / "tiny-deepseek.yaml"} if name.startswith("deepseek") else {}
    launch(tmp_path / "straight", saved, *RUN, *saved_layout, *model, **config)
    launch(tmp_path / "resumed", saved, *RUN, *saved_layout, *model, "train.exit_interval=4", **config)
    proc = launch(tmp_path / "resumed", resumed, *RUN, *resumed_layout, *model, **config)
    sizes = dict(item.split("=") for item in saved_layout)
    tp, ep, etp = (sizes.get(f"parallel.{key}", "1") for key in ("tensor", "expert", "expert_tensor"))
    assert f"resuming from step 4 (saved in world {saved}, TP {tp}, EP {ep}, ETP {etp}: re-cut in" in proc.stdout
    assert_continues(metrics(tmp_path / "resumed"), metrics(tmp_path / "straight"))


def test_changed_schedule_takes_effect_on_resume(tmp_path):
    """Training longer at a lower LR (with smoothing turned on, on shorter sequences): from step 5 on,
    the LRs are those torch's CosineAnnealingLR gives for the new settings (SMALL's warmup_steps=1:
    step k >= 2 has the cosine's LR after k - 2 steps)."""
    stopped_at_4(tmp_path, 1, [])
    proc = launch(tmp_path, 1, *RUN, "train.max_steps=12", "train.lr=0.004", "smoothing.enabled=true",
                  "data.seq_length=32")
    assert "resuming from step 4 (loaded in" in proc.stdout
    assert ("s) with changed settings: data.seq_length: 64 -> 32, smoothing.enabled: False -> True, "
            "train.exit_interval: 4 -> 0, train.lr: 0.01 -> 0.004, train.max_steps: 8 -> 12") in proc.stdout
    assert "note: data.seq_length changed: the samples come in another order from here on" in proc.stdout
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.004)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=12 - 1, eta_min=0.004 * 0.1)
    want = []
    for _ in range(12 - 1):
        want.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        cosine.step()
    rows = metrics(tmp_path)
    assert [r["step"] for r in rows] == list(range(1, 13))
    assert [r["lr"] for r in rows[4:]] == pytest.approx(want[3:], rel=1e-9)


def test_wsd_run_extended_before_its_decay_equals_the_longer_run(tmp_path):
    """Warmup-stable-decay: a run planned for 8 steps, stopped at step 4 (before its decay) and
    resumed with train.max_steps=12 is, bit for bit, the run planned for 12 steps from the start
    (the sample corpus is one epoch for both, so the data order of steps 1-12 is the same)."""
    wsd = [*RUN, "train.lr_schedule=wsd"]
    straight_dir, resumed_dir = tmp_path / "straight", tmp_path / "resumed"
    launch(straight_dir, 1, *wsd, "train.max_steps=12")
    launch(resumed_dir, 1, *wsd, "train.exit_interval=4")
    proc = launch(resumed_dir, 1, *wsd, "train.max_steps=12")
    assert "with changed settings: train.exit_interval: 4 -> 0, train.max_steps: 8 -> 12" in proc.stdout
    got, want = metrics(resumed_dir), metrics(straight_dir)
    assert [r["step"] for r in got] == [r["step"] for r in want] == list(range(1, 13))
    assert len({r["lr"] for r in want[1:11]}) == 1 and want[11]["lr"] < want[10]["lr"]  # stable, then decaying
    for g, w in zip(got, want):
        for key in ("loss", "aux_loss", "grad_norm", "lr"):
            assert g[key] == w[key], (g["step"], key)
