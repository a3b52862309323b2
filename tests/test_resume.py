"""Starting again in the same run directory resumes exactly: 8 steps straight and 4 + 4 give
identical losses for steps 5-8 (model, ZeRO optimizer partitions, LR schedule, RNG, data position)."""
import pytest

from conftest import launch, metrics

RUN = ["train.max_steps=8", "train.eval_interval=4"]


@pytest.mark.parametrize("nproc, layout", [(1, []), (2, ["parallel.expert=2", "parallel.zero_stage=2"])],
                         ids=["one process", "EP2 ZeRO-2"])
def test_resume_is_exact(nproc, layout, tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    launch(straight, nproc, *RUN, *layout)
    launch(split, nproc, *RUN, *layout, "train.exit_interval=4")
    assert [r["step"] for r in metrics(split)] == [1, 2, 3, 4]
    assert (split / "checkpoints" / "latest").read_text() == "step_00000004"
    proc = launch(split, nproc, *RUN, *layout)
    assert "resuming from step 4" in proc.stdout
    resumed, reference = metrics(split)[4:], metrics(straight)[4:]
    assert [r["step"] for r in resumed] == [r["step"] for r in reference] == [5, 6, 7, 8]
    for got, want in zip(resumed, reference):
        for key in ("loss", "aux_loss", "grad_norm", "lr"):
            assert got[key] == want[key], (got["step"], key)
    assert resumed[-1]["val_loss"] == reference[-1]["val_loss"]
