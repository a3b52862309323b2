"""The batch script sdmoe-submit writes runs unchanged under a local SLURM stand-in (tests/
slurm_standin: srun starts the tasks here with SLURM's variables, scontrol answers for 2 "nodes"):
ranks and rendezvous are right (the 2-task EP2 run equals one process) and a stop for time ends
in a requeue."""
import os
import subprocess
import sys

import pytest

from conftest import CONFIG, DISTRIBUTED_ENV, REPO, SMALL, launch, metrics

STANDIN = REPO / "tests" / "slurm_standin"


def submit(run_dir, *args, check=True):
    proc = subprocess.run([sys.executable, "-m", "megatron_sdmoe.launch.slurm", str(CONFIG), *SMALL,
                           f"run.dir={run_dir}", "--nodes", "2", "--gpus-per-node", "1", "--dry-run", *args],
                          cwd=REPO, capture_output=True, text=True)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def run_job(run_dir, tmp_path):
    """Run the batch script as SLURM would on a 2-node allocation, with the stand-ins on PATH."""
    env = {k: v for k, v in os.environ.items() if k not in DISTRIBUTED_ENV}
    env.update(PATH=f"{STANDIN}:{env['PATH']}", SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="node[1-2]",
               SLURM_NNODES="2", SLURM_NTASKS="2", SLURM_NTASKS_PER_NODE="1", MASTER_PORT="29517",
               STANDIN_LOG=str(tmp_path / "scontrol.log"), OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    return subprocess.run(["bash", str(run_dir / "slurm" / "job.sbatch")], env=env, capture_output=True, text=True,
                          timeout=900)


def test_batch_script_trains_on_two_standin_nodes(tmp_path):
    run_dir = tmp_path / "job"
    script = submit(run_dir, "parallel.expert=2").stdout
    assert "#SBATCH --nodes=2" in script and "#SBATCH --signal=USR1@120" in script and "--requeue" in script
    job = run_job(run_dir, tmp_path)
    assert job.returncode == 0, job.stdout[-2000:] + job.stderr[-3000:]
    launch(tmp_path / "one", 1)
    for got, want in zip(metrics(run_dir), metrics(tmp_path / "one")):
        assert got["loss"] == pytest.approx(want["loss"], abs=2e-5)
    assert not (tmp_path / "scontrol.log").exists()  # finished: no requeue


def test_stop_for_time_requeues(tmp_path):
    run_dir = tmp_path / "job"
    submit(run_dir, "train.time_budget_minutes=0.001")
    job = run_job(run_dir, tmp_path)
    assert job.returncode == 3, job.stdout[-2000:] + job.stderr[-3000:]
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "4242"]
    assert (run_dir / "checkpoints" / "latest").exists()


def test_submit_bad_input(tmp_path):
    proc = submit(tmp_path / "job", "parallel.expert=4", check=False)  # 2 GPUs cannot hold EP4
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("error: world size 2")
    assert not (tmp_path / "job").exists()
