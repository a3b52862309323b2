"""Starting again in the same run directory resumes exactly: 8 steps straight and 4 + 4 give
identical losses for steps 5-8 (model, ZeRO optimizer partitions, LR schedule, RNG, data position).
Resuming with another number of processes (another data-parallel size) continues the same run:
the losses of one run in two layouts agree to round-off (test_parallel_parity.py)."""
import pytest

from conftest import launch, metrics

RUN = ["train.max_steps=8", "train.eval_interval=4"]
LAYOUTS = {"one process": (1, []), "EP2 ZeRO-2": (2, ["parallel.expert=2", "parallel.zero_stage=2"])}


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
    resumed, reference = metrics(tmp_path)[4:], straight(name)[4:]
    assert [r["step"] for r in resumed] == [r["step"] for r in reference] == [5, 6, 7, 8]
    for got, want in zip(resumed, reference):
        for key in ("loss", "aux_loss", "grad_norm", "lr"):
            assert got[key] == want[key], (got["step"], key)
    assert resumed[-1]["val_loss"] == reference[-1]["val_loss"]


@pytest.mark.parametrize("name, saved, resumed", [("one process", 1, 2), ("EP2 ZeRO-2", 4, 2)],
                         ids=["DP1 to DP2", "EP2: DP4 to DP2 (expert DP 2 to 1)"])
def test_resume_at_another_data_parallel_size(name, saved, resumed, straight, tmp_path):
    """Against the straight run in LAYOUTS' number of processes. The ZeRO partitions are re-cut: Adam
    moments misplaced by one element move step 6's loss by 0.1."""
    layout = LAYOUTS[name][1]
    stopped_at_4(tmp_path, saved, layout)
    proc = launch(tmp_path, resumed, *RUN, *layout)
    assert "resuming from step 4" in proc.stdout
    rows, reference = metrics(tmp_path), straight(name)
    assert [r["step"] for r in rows] == [r["step"] for r in reference] == list(range(1, 9))
    for got, want in zip(rows, reference):  # tolerances of test_parallel_parity.py
        assert got["loss"] == pytest.approx(want["loss"], abs=2e-5), got["step"]
        assert got["aux_loss"] == pytest.approx(want["aux_loss"], abs=2e-4), got["step"]
        assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-4), got["step"]
        assert got["lr"] == pytest.approx(want["lr"], rel=1e-12)
    assert rows[-1]["val_loss"] == pytest.approx(reference[-1]["val_loss"], abs=2e-5)
