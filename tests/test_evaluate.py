"""sdmoe-eval: a checkpoint's validation and test losses equal the ones its run measured at that
step, in another layout too, on other data the same as a run that validated on that data, for
every stage of a continual run; the run directory is left as it was; bad input is one line."""
import json
from pathlib import Path

import pytest

from conftest import launch, launch_module, metrics

EVAL = "megatron_sdmoe.evaluate"
LOSSES = ("val_loss", "test_loss")


def snapshot(run_dir: Path) -> dict:
    """Every file of the run directory but the data index cache, with its size and modification time."""
    return {str(p.relative_to(run_dir)): (p.stat().st_size, p.stat().st_mtime_ns) for p in run_dir.rglob("*")
            if p.is_file() and "data_cache" not in p.parts}


def evaluate(run_dir: Path, nproc: int, *overrides: str, check: bool = True):
    return launch_module(EVAL, [str(run_dir), *overrides], nproc, check)


def test_eval_in_another_layout_equals_the_runs_last_evaluation(tmp_path):
    """The latest checkpoint by default, an earlier one with --step; the test set is evaluated at
    the run's end only, so at step 2 its loss is compared with the validation loss's difference.
    The run resumed at step 2 on another split: each checkpoint is evaluated on the data its
    training validated on then."""
    run, settings = tmp_path / "run", ["parallel.expert=2", "train.max_steps=4", "train.eval_interval=2",
                                       "train.save_interval=2"]
    launch(run, 2, *settings, "data.split=96,2,2", "train.exit_interval=2")
    launch(run, 2, *settings, "data.split=90,6,4")
    logged, before = {row["step"]: row for row in metrics(run)}, snapshot(run)
    for nproc, layout, step in ((1, ["parallel.expert=1"], None), (2, ["parallel.expert=1", "parallel.tensor=2"], None),
                                (1, ["parallel.expert=1"], 2)):
        out = tmp_path / f"eval{nproc}-{step}.json"
        proc = evaluate(run, nproc, *layout, *(["--step", str(step)] if step else []), "--json", str(out))
        result = json.loads(out.read_text())
        assert result["step"] == (step or 4)
        assert result["checkpoint"] == str(run / "checkpoints" / f"step_{step or 4:08d}")
        for key in LOSSES if step is None else ["val_loss"]:
            assert result[key] == pytest.approx(logged[result["step"]][key], abs=2e-5), (layout, key)
            assert f"{key:<24} {result[key]:.4f}" in proc.stdout
    assert logged[2]["val_loss"] - logged[4]["val_loss"] > 1e-3  # --step 2 did not evaluate step 4's weights
    assert snapshot(run) == before


def test_eval_on_other_data_equals_a_run_validated_on_it(domains, tmp_path):
    """Validated on the upper-cased corpus and tested on the other: evaluating with the two swapped
    gives the run's test loss as validation loss and its validation loss as test loss."""
    prose, shout = domains["prose"], domains["shout"]
    run = tmp_path / "run"
    launch(run, 1, f"data.path=[{prose}]", f"data.valid_path=[{shout}]", f"data.test_path=[{prose}]",
           f"data.tokenizer={domains['tokenizer']}", "train.eval_interval=4")
    logged = metrics(run)[-1]
    out = tmp_path / "swapped.json"
    evaluate(run, 1, f"data.valid_path=[{prose}]", f"data.test_path=[{shout}]", "--json", str(out))
    result = json.loads(out.read_text())
    assert result["val_loss"] == pytest.approx(logged["test_loss"], abs=2e-5)
    assert result["test_loss"] == pytest.approx(logged["val_loss"], abs=2e-5)
    assert abs(result["val_loss"] - result["test_loss"]) > 0.01  # the corpora differ


@pytest.mark.parametrize("names", [["prose", "shout"], ["shout"]])  # one stage: training logs its loss too
def test_eval_of_a_continual_run_reports_every_stage(names, domains, tmp_path):
    stages = ", ".join(f"{{name: {name}, steps: {4 // len(names)}, path: [{domains[name]}]}}" for name in names)
    run = tmp_path / "run"
    launch(run, 1, f"data.stages=[{stages}]", f"data.tokenizer={domains['tokenizer']}", "data.split=96,2,2")
    logged = metrics(run)[-1]
    out = tmp_path / "eval.json"
    evaluate(run, 1, "--json", str(out))
    result = json.loads(out.read_text())
    keys = [*(f"stage_loss_{name}" for name in names), "test_loss"]
    assert set(result) == {"checkpoint", "step", "val_loss", *keys}
    for key in keys:
        assert result[key] == pytest.approx(logged[key], abs=2e-5), key
    assert result["val_loss"] == pytest.approx(logged["stage_loss_shout"], abs=2e-5)  # the last stage's data


def test_bad_input_is_one_line(tmp_path):
    run = tmp_path / "run"
    launch(run, 1, "train.max_steps=1", "train.final_checkpoint=false")  # a config.yaml, no checkpoint
    cases = {
        (str(tmp_path / "nothing"),): f"error: {tmp_path / 'nothing'} holds no config.yaml: pass a run directory "
                                      "that sdmoe-train wrote",
        (str(run), f"run.dir={tmp_path}"): "error: run.dir is the RUN_DIR argument: drop the run.dir override",
        (str(run), "train.eval_samples=0"): "error: train.eval_samples=0 leaves nothing to evaluate: set "
                                            "train.eval_samples",
        (str(run),): f"error: run.dir {run} holds no checkpoint: pass a run directory that has saved one "
                     "(train.save_interval, or the end of its run)",
        (str(run), "--step", "1"): f"error: {run} holds no checkpoint ({run / 'checkpoints' / 'latest'} does not "
                                   "exist): give the run.dir of a run that has saved one",
        (str(run), "--json", str(tmp_path / "missing" / "x.json")):
            f"error: --json {tmp_path / 'missing' / 'x.json'}: directory {tmp_path / 'missing'} does not exist or "
            "is not writable: create it or write elsewhere",
    }
    for args, line in cases.items():
        proc = launch_module(EVAL, list(args), 1, check=False)
        assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1] == line, (args, proc.stderr[-2000:])
    assert not (tmp_path / "missing").exists()
