"""The batch script sdmoe-submit writes runs unchanged under a local SLURM stand-in (tests/
slurm_standin: srun starts the tasks here with SLURM's variables, scontrol answers for 2 "nodes"),
in both launch modes: one task per GPU, and one task per node running torchrun (--per-node, static
rendezvous). Ranks and rendezvous are right (the EP2 run on 2 "nodes" x 1 GPU equals one process)
and a stop for time ends in a requeue; --chain submits jobs that each wait for the one before."""
import subprocess
import sys

import pytest

from conftest import CONFIG, REPO, SMALL, launch, metrics, python_m, run_env

STANDIN = REPO / "tests" / "slurm_standin"


def submit(run_dir, *args, check=True):
    proc = python_m("megatron_sdmoe.launch.slurm", CONFIG, *SMALL, f"run.dir={run_dir}", "--nodes", "2",
                    "--gpus-per-node", "1", "--dry-run", *args)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def run_job(run_dir, tmp_path):
    """Run the batch script as SLURM would on a 2-node allocation, with the stand-ins on PATH."""
    env = run_env()
    env.update(PATH=f"{STANDIN}:{env['PATH']}", SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="node[1-2]",
               SLURM_NNODES="2", SLURM_NTASKS="2", SLURM_NTASKS_PER_NODE="1", MASTER_PORT="29517",
               STANDIN_LOG=str(tmp_path / "scontrol.log"))
    return subprocess.run(["bash", str(run_dir / "slurm" / "job.sbatch")], env=env, capture_output=True, text=True,
                          timeout=900)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("one")
    launch(run_dir, 1)
    return metrics(run_dir)


@pytest.mark.parametrize("mode", [[], ["--per-node"]], ids=["per-gpu", "per-node"])
def test_batch_script_trains_on_two_standin_nodes(mode, tmp_path, one_process):
    run_dir = tmp_path / "job"
    script = submit(run_dir, "parallel.expert=2", *mode).stdout
    assert "#SBATCH --nodes=2" in script and "#SBATCH --signal=USR1@120" in script and "--requeue" in script
    if mode:  # one task per node, torchrun meeting at the first node, SLURM's node id as its rank
        assert "#SBATCH --ntasks-per-node=1" in script
        assert "PET_NODE_RANK=$SLURM_NODEID" in script and "--nproc-per-node=1" in script
        assert "--rdzv-backend=static --rdzv-endpoint=$MASTER_ADDR:$MASTER_PORT" in script
    job = run_job(run_dir, tmp_path)
    assert job.returncode == 0, job.stdout[-2000:] + job.stderr[-3000:]
    assert "world 2 (TP 1, EP 2, DP 2)" in job.stdout
    got = metrics(run_dir)
    assert [row["step"] for row in got] == [1, 2, 3, 4]
    for g, w in zip(got, one_process):
        assert g["loss"] == pytest.approx(w["loss"], abs=2e-5)
    assert not (tmp_path / "scontrol.log").exists()  # finished: no requeue


@pytest.mark.parametrize("mode", [[], ["--per-node"]], ids=["per-gpu", "per-node"])
def test_stop_for_time_requeues(mode, tmp_path):
    run_dir = tmp_path / "job"
    submit(run_dir, "train.time_budget_minutes=0.001", *mode)
    job = run_job(run_dir, tmp_path)
    assert job.returncode == 3, job.stdout[-2000:] + job.stderr[-3000:]
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "4242"]
    assert (run_dir / "checkpoints" / "latest").exists()


def test_submit_bad_input(tmp_path):
    proc = submit(tmp_path / "job", "parallel.expert=4", check=False)  # 2 GPUs cannot hold EP4
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("error: world size 2")
    assert not (tmp_path / "job").exists()
    proc = submit(tmp_path / "job", "--chain", "-1", check=False)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1] == (
        "error: --chain -1: give the number of jobs to queue after the first (0: none)")


@pytest.mark.parametrize("profile, args, message", [
    ("time: 2.5\n", [], "error: cluster profile PROFILE: time is 2.5, not text: quote it"),
    ("qos: [a]\n", [], "error: cluster profile PROFILE: qos is ['a'], not text: quote it"),
    ("time: '3 days'\n", [], "error: cluster profile PROFILE: time '3 days' is not a SLURM time limit"),
    ("env: [A, B]\n", [], "error: cluster profile PROFILE: env must map variable names"),
    ("env: {BAD NAME: 1}\n", [], "error: cluster profile PROFILE: env must map variable names"),
    ("cpus_per_gpu: 0\n", [], "error: cluster profile PROFILE: cpus_per_gpu=0 must be a whole number of at least 1"),
    ("", ["--time", "-1"], "error: --time '-1' is not a SLURM time limit: give minutes, HH:MM:SS or D-HH:MM:SS"),
    ("", ["--after", "job7"], "error: --after 'job7' is not a SLURM job id: give the number sbatch printed"),
    ("", ["--account", "a\n#SBATCH --wrap=rm"], "error: --account 'a\\n#SBATCH --wrap=rm' holds whitespace, which an "
                                              "#SBATCH line cannot carry: give it without"),
    ("partition: a b\n", [], "error: --partition 'a b' holds whitespace"),
    ("", ["run.dir=/tmp/with space"], "error: run.dir '/tmp/with space' holds whitespace"),
])
def test_submit_refuses_bad_times_ids_and_profiles(profile, args, message, tmp_path):
    (tmp_path / "site.yaml").write_text(profile)
    proc = submit(tmp_path / "job", "--profile", str(tmp_path / "site.yaml"), *args, check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith(message.replace("PROFILE", str(tmp_path / "site.yaml"))), lines[0]
    assert not (tmp_path / "job").exists()


def test_profile_sets_site_defaults(tmp_path):
    """A site profile's directives, container and environment land in the script; its env comes
    after the NCCL defaults, so it overrides them; in the container its python is used. An unquoted
    time is the time written (YAML 1.1 would read 36:00:00 as 129,600 seconds)."""
    profile = tmp_path / "site.yaml"
    profile.write_text("partition: gpu\naccount: proj1\ncontainer: registry/sdmoe:1\ncpus_per_gpu: 4\n"
                       "env: {NCCL_IB_TIMEOUT: 23, NCCL_SOCKET_IFNAME: ib0}\ntime: 36:00:00\n")
    script = submit(tmp_path / "job", "--profile", str(profile), "--per-node").stdout
    assert "#SBATCH --partition=gpu" in script and "#SBATCH --account=proj1" in script
    assert "#SBATCH --time=36:00:00" in script
    assert "#SBATCH --cpus-per-task=4" in script  # one GPU per node here
    assert "srun --kill-on-bad-exit=1 --container-image=registry/sdmoe:1" in script
    assert " python -m megatron_sdmoe.launch.torchrun" in script
    assert script.index("NCCL_IB_TIMEOUT=${NCCL_IB_TIMEOUT:-22}") < script.index("export NCCL_IB_TIMEOUT=23")
    assert "export NCCL_SOCKET_IFNAME=ib0" in script


def test_a_chain_of_jobs_each_after_the_one_before(tmp_path):
    """--chain 2 --after 77: three submissions of the one script, the first after job 77, each
    other after the job submitted before it (the sbatch stand-in numbers them 100, 101, 102)."""
    env = run_env()
    env.update(PATH=f"{STANDIN}:{env['PATH']}", STANDIN_LOG=str(tmp_path / "sbatch.log"))
    run_dir = tmp_path / "job"
    proc = subprocess.run([sys.executable, "-m", "megatron_sdmoe.launch.slurm", str(CONFIG), *SMALL,
                           f"run.dir={run_dir}", "--nodes", "1", "--gpus-per-node", "1", "--chain", "2",
                           "--after", "77"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    script = run_dir / "slurm" / "job.sbatch"
    assert (tmp_path / "sbatch.log").read_text().splitlines() == [
        f"--parsable --dependency=afterany:{after} {script}" for after in (77, 100, 101)]
    assert proc.stdout.splitlines() == [f"submitted job {job}, to start once job {after} has ended: {script}"
                                        for job, after in ((100, 77), (101, 100), (102, 101))]
    dry = submit(tmp_path / "dry", "--chain", "2", "--after", "77")  # the same sbatch commands, printed
    assert dry.stdout.splitlines()[-3:] == [
        f"# would run: sbatch --parsable {dependency} {tmp_path / 'dry' / 'slurm' / 'job.sbatch'}  (job {job})"
        for job, dependency in ((1, "--dependency=afterany:77"), (2, "'--dependency=afterany:<job 1>'"),
                                (3, "'--dependency=afterany:<job 2>'"))]
