"""
train.py under a real one-node Slurm: `srun -n 2`, an sbatch job, and preemption with requeue.
Needs Debian's slurm-wlm and munge and root (.ci/run installs them); skipped where they are missing.
"""

import json
import os
import shutil
import subprocess
import time

import pytest

from conftest import REPO, run_script
from test_distributed import train_losses

pytestmark = pytest.mark.skipif(
    not (shutil.which("slurmctld") and shutil.which("slurmd") and shutil.which("munged") and os.geteuid() == 0),
    reason="needs root and Debian's slurm-wlm + munge (apt-get install slurm-wlm munge)")

# identical in every run here, so the interrupted job can be compared with the uninterrupted one
ARGS = ["--dataset=shakespeare_char", "--device=cpu", "--compile=False", "--n_layer=2", "--n_head=2", "--n_embd=32",
        "--block_size=32", "--batch_size=4", "--dropout=0.0", "--max_iters=150", "--eval_interval=50",
        "--eval_iters=2", "--log_interval=1", "--warmup_iters=10", "--lr_decay_iters=150", "--plot=False",
        "--gradient_accumulation_steps=2"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, shakespeare_source):
    work = tmp_path_factory.mktemp("slurm")
    conf_dir = work / "cluster"
    subprocess.run([os.path.join(REPO, "slurm/local_cluster.sh"), "start", str(conf_dir)], check=True, timeout=120)
    env = dict(os.environ, SLURM_CONF=str(conf_dir / "slurm.conf"), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               GPT_TOOLKIT_DIR=REPO)
    run_script("prepare.py", "shakespeare_char", f"--source={shakespeare_source}", cwd=work)
    try:
        yield work, env
    finally:
        subprocess.run([os.path.join(REPO, "slurm/local_cluster.sh"), "stop", str(conf_dir)], timeout=60)


@pytest.fixture(scope="module")
def shakespeare_source(tmp_path_factory):
    from conftest import SHARED, generated_text
    path = os.path.join(SHARED, "data", "tinyshakespeare.txt")
    if os.path.exists(path):
        return os.path.abspath(path)
    path = tmp_path_factory.mktemp("text") / "generated.txt"
    path.write_text(generated_text())
    return str(path)


def job_state(job_id, env):
    out = subprocess.run(["scontrol", "show", "job", job_id], env=env, capture_output=True, text=True).stdout
    fields = dict(f.split("=", 1) for f in out.split() if "=" in f)
    return fields.get("JobState"), int(fields.get("Restarts", 0))


def wait_for(condition, timeout, what):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def srun_reference(cluster):
    """The uninterrupted 2-rank run, started with srun as a user would inside an allocation."""
    work, env = cluster
    proc = subprocess.run(["srun", "-n", "2", "--time=10", "python", os.path.join(REPO, "train.py"), *ARGS,
                           "--out_dir=srun"], cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, train_losses(work / "srun")


def test_sbatch_script_says_where_train_py_is_missing(tmp_path):
    """Submitted from a folder without the toolkit (and no GPT_TOOLKIT_DIR), the job says what to do before srun
    starts anything. Run as Slurm runs it, by bash, from that folder."""
    env = {k: v for k, v in os.environ.items() if k != "GPT_TOOLKIT_DIR"}
    proc = subprocess.run(["bash", os.path.join(REPO, "slurm/train.sbatch"), "config/gpt2_124m.py"], cwd=tmp_path,
                          env=dict(env, SLURM_SUBMIT_DIR=str(tmp_path)), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stderr == (f"error: no train.py in {tmp_path}: submit from the toolkit's "
                                                    "folder, or set GPT_TOOLKIT_DIR to it\n"), proc.stderr


def test_srun_two_ranks(cluster, srun_reference):
    work, env = cluster
    proc, losses = srun_reference
    assert "launch: slurm, 2 process(es)" in proc.stdout
    assert sorted(losses) == list(range(1, 151))
    assert (work / "srun/ckpt.pt").exists() and (work / "srun/ckpt_00000150.pt").exists()
    # the same data and math as one process accumulating over 2 micro-steps
    run_script("train.py", *ARGS, "--max_iters=20", "--out_dir=single",
               cwd=work)
    single = train_losses(work / "single")
    for step in range(1, 11):  # same lr schedule (lr_decay_iters) so the first steps match
        assert abs(single[step] - losses[step]) < 1e-5, (step, single[step], losses[step])


JOBS = []  # submitted by the test under way


@pytest.fixture(autouse=True)
def cancel_jobs_left_behind(cluster):
    """A job that outlives its failed test would hold the node's CPUs and fail the next test too."""
    yield
    if JOBS:
        subprocess.run(["scancel", *JOBS], env=cluster[1], timeout=60)
        JOBS.clear()


def sbatch(work, env, out_dir, *extra):
    proc = subprocess.run(["sbatch", "--parsable", "--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1",
                           "--gres=none", "--time=10", f"--output={work}/{out_dir}.out", *extra,
                           os.path.join(REPO, "slurm/train.sbatch"), *ARGS, f"--out_dir={out_dir}"],
                          cwd=work, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    JOBS.append(proc.stdout.strip().split(";")[0])
    return JOBS[-1]


def test_sbatch_job(cluster, srun_reference):
    work, env = cluster
    job = sbatch(work, env, "batch")
    wait_for(lambda: job_state(job, env)[0] in ("COMPLETED", "FAILED", "CANCELLED"), 300, "the sbatch job")
    output = (work / "batch.out").read_text()
    assert job_state(job, env)[0] == "COMPLETED", output[-3000:]
    assert "launch: slurm, 2 process(es)" in output
    assert train_losses(work / "batch") == srun_reference[1]


def test_preempted_job_requeues_and_resumes_exactly(cluster, srun_reference):
    """Also with rank 1 slow to exit (on a real cluster, NCCL's teardown can take seconds): the batch script's
    `srun --kill-on-bad-exit` signals it once rank 0 has exited with code 3, and that must not turn its code into
    143 (killed by SIGTERM), which the script would not requeue."""
    work, env = cluster
    slow_exit = work / "slow_exit"
    slow_exit.mkdir(exist_ok=True)
    (slow_exit / "sitecustomize.py").write_text(
        "import atexit, os, time\n"
        "if os.environ.get('SLURM_PROCID') == '1':\n"
        "    atexit.register(time.sleep, 3)\n")
    env = dict(env, PYTHONPATH=os.pathsep.join(filter(None, [str(slow_exit), env.get("PYTHONPATH")])))
    job = sbatch(work, env, "preempt")
    log = work / "preempt/log.jsonl"

    def trained_some():
        return log.exists() and sum(1 for line in log.read_text().splitlines() if '"loss"' in line) >= 20
    wait_for(trained_some, 300, "the job to train 20 steps")
    subprocess.run(["scancel", "--signal=USR1", job], env=env, check=True)
    wait_for(lambda: job_state(job, env)[1] == 1, 120, "the job to be requeued")
    # slurmctld holds a requeued job back for a couple of minutes (its begin time); a test need not wait for that, but
    # not "now" either: slurmd revokes the first run's credential, with a one-second clock, and kills a restart
    # within that second ("Job credential revoked"), which happened here under load
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now+5"], env=env, check=True)
    wait_for(lambda: job_state(job, env)[0] in ("COMPLETED", "FAILED", "CANCELLED"), 300,
             "the requeued job to end")

    output = (work / "preempt.out").read_text()
    assert job_state(job, env) == ("COMPLETED", 1), output[-3000:]
    assert "stopping on SIGUSR1" in output and "requeueing job" in output, output[-3000:]
    assert "resumed from preempt/ckpt.pt" in output
    with open(log) as f:
        steps = [r["step"] for r in map(json.loads, f) if "loss" in r]
    assert steps == list(range(1, 151))  # every step once: the resumed run continued the log without duplicates
    assert train_losses(work / "preempt") == srun_reference[1]  # bit-identical to the uninterrupted run


def test_a_failing_rank_ends_the_job(cluster):
    """Rank 0 alone fails mid-run (its numbered checkpoint cannot be written): the job fails with rank 0's message
    and is not requeued, and the other rank does not outlive it (the per-step stop vote carries the failure, so both
    ranks stop at the same step)."""
    work, env = cluster
    os.makedirs(work / "broken/ckpt_00000050.pt")
    job = sbatch(work, env, "broken")
    wait_for(lambda: job_state(job, env)[0] in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"), 300, "the job to end")
    output = (work / "broken.out").read_text()
    assert job_state(job, env)[0] == "FAILED", output[-3000:]
    assert "error: could not write a checkpoint to broken" in output and "requeueing" not in output
