"""Batch-size warmup (`train.batch_size_schedule`): each step's global batch is the one
megatron-core's step batch-size calculator gives for the samples consumed before it; a run with a
schedule is the constant-batch run until the batch grows, the same in every layout, and resumes
exactly across the change."""
import pytest
from megatron.core.num_microbatches_calculator import StepBatchsizeNumMicroBatchesCalculator

from conftest import CONFIG, SMALL, launch, metrics
from megatron_sdmoe.config import load_config
from megatron_sdmoe.errors import UserError
from megatron_sdmoe.training.batches import BatchSchedule
from megatron_sdmoe.training.schedule import LRMultiplier
from megatron_sdmoe.validation import validate

SCHEDULE = "train.batch_size_schedule=0:4 640:8"  # SMALL's 64-token samples: batch 8 from sample 10 on
RUN = [SCHEDULE, "train.max_steps=6"]


@pytest.mark.parametrize("schedule, seq_length", [
    ("0:4 640:8", 64),
    ("0:768 250B:1536 500B:3072 750B:6144", 4096),  # megatron-core's own example
    ("0:8 100:16 110:64 120:32", 10),  # 110 tokens (sample 11) is jumped over: batch 16 runs from 10 to 26
    ("0:3072 1.5K:15360", 1)])
def test_each_steps_batch_is_megatron_cores(schedule, seq_length):
    cfg = load_config(CONFIG, [f"train.batch_size_schedule={schedule}", f"data.seq_length={seq_length}"])
    batches = BatchSchedule(cfg)
    reference = StepBatchsizeNumMicroBatchesCalculator(1, 1, False, -1, schedule, seq_length)
    consumed = 0
    for step in range(3000):
        reference.update(consumed, consistency_check=False)
        assert batches.size(step) == reference.get_current_global_batch_size(), step
        assert batches.first_sample(step) == consumed, step
        consumed += reference.get_current_global_batch_size()


def test_a_run_warms_up_its_batch(tmp_path):
    """Steps 1-3 (samples 0-11) at batch 4 are the batch-4 run's, bit for bit; from step 4 on,
    batch 8. Two processes at EP2 (one micro-batch per rank and step, then two) equal one process
    (two, then four)."""
    launch(tmp_path / "warmup", 1, *RUN)
    launch(tmp_path / "batch4", 1, "train.global_batch_size=4", "train.max_steps=6")
    launch(tmp_path / "ep2", 2, *RUN, "parallel.expert=2")
    warmup, batch4, ep2 = (metrics(tmp_path / name) for name in ("warmup", "batch4", "ep2"))
    assert [row["global_batch"] for row in warmup] == [4, 4, 4, 8, 8, 8]
    for got, want in zip(warmup[:3], batch4[:3]):
        assert got["loss"] == want["loss"] and got["grad_norm"] == want["grad_norm"], got["step"]
    assert warmup[3]["loss"] != batch4[3]["loss"]
    for got, want in zip(ep2, warmup):
        assert got["loss"] == pytest.approx(want["loss"], abs=2e-5), got["step"]
        assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-4), got["step"]


@pytest.mark.parametrize("stop", [2, 4], ids=["before the change", "after it"])
def test_resume_across_the_change_is_exact(stop, tmp_path):
    """Also what shows that the optimizer steps at each step's end: the engine of a resumed run
    counts micro-batches from 0, the straight run's from step 1; left to DeepSpeed's count (a
    multiple of the accumulation steps), the straight run would step in the middle of step 4's batch.
    The LR schedule runs in tokens: warmup_steps=1 is the first 8 samples, two steps of batch 4."""
    run = [*RUN, "train.lr_schedule_unit=tokens"]
    launch(tmp_path / "straight", 1, *run)
    launch(tmp_path / "resumed", 1, *run, f"train.exit_interval={stop}")
    proc = launch(tmp_path / "resumed", 1, *run)
    assert f"resuming from step {stop}" in proc.stdout
    got, want = metrics(tmp_path / "resumed"), metrics(tmp_path / "straight")
    assert [row["step"] for row in got] == list(range(1, 7))
    for g, w in zip(got, want):
        for key in ("loss", "grad_norm", "lr", "global_batch"):
            assert g[key] == w[key], (g["step"], key)
    multiplier = LRMultiplier(load_config(CONFIG, [*SMALL, *run]))
    assert [row["lr"] for row in want] == pytest.approx([0.01 * multiplier(step) for step in range(6)], rel=1e-6)
    assert want[0]["lr"] == pytest.approx(0.005) and want[1]["lr"] == pytest.approx(0.01)


@pytest.mark.parametrize("schedule, message", [
    ("0:4 640", 'Invalid schedule entry "640"'),
    ("64:4 640:8", "first schedule entry must have threshold 0"),
    ("0:4 640:16", "ends at a global batch of 16, not train.global_batch_size=8")])
def test_a_bad_schedule_is_refused_by_name(schedule, message):
    cfg = load_config(CONFIG, [*SMALL, f"train.batch_size_schedule={schedule}"])
    with pytest.raises(UserError, match=message):
        validate(cfg, 2)


def test_batches_must_divide_from_the_resumed_step_on(tmp_path):
    """Batch 2 (steps 1-2: 256 tokens are 4 samples) is no multiple of 2 ranks x micro-batch 2: a
    fresh start in two processes is refused; a run that has passed it may move to two processes."""
    schedule = ["train.batch_size_schedule=0:2 256:8", "train.max_steps=4"]
    refused = launch(tmp_path / "fresh", 2, *schedule, check=False)
    assert refused.returncode == 2 and refused.stderr.strip().splitlines() == [
        "error: train.batch_size_schedule's global batch 2 (from step 0 on) is not divisible by "
        "train.micro_batch_size x data-parallel size = 4: make each batch a multiple of 4, or change the layout"]
    assert not (tmp_path / "fresh").exists()
    launch(tmp_path / "moved", 1, *schedule, "train.exit_interval=2")
    # thresholds in tokens: at another sequence length the batches would grow at other steps
    refused = launch(tmp_path / "moved", 2, *schedule, "data.seq_length=32", check=False)
    assert refused.returncode == 2 and refused.stderr.strip().splitlines()[-1].startswith(
        f"error: checkpoint {tmp_path / 'moved' / 'checkpoints' / 'step_00000002'} was trained with "
        "data.seq_length=64, not 32: train.batch_size_schedule's thresholds are tokens"), refused.stderr
    proc = launch(tmp_path / "moved", 2, *schedule)
    assert "resuming from step 2" in proc.stdout
    assert [row["global_batch"] for row in metrics(tmp_path / "moved")] == [2, 2, 8, 8]
