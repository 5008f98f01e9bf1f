"""launch/slurm.sbatch on a real SLURM cluster: slurmctld + slurmd + munged on this machine, one node.

Debian's slurm-wlm and munge are installed when missing (root + apt-get; skipped otherwise).
The jobs run the tiny model on CPU with 2 ranks (gloo), as `sbatch launch/slurm.sbatch ...` would
on a GPU cluster. Everything here, from the install to the last job, shares one time budget
(BUDGET_S) enforced with SIGALRM, so no test of this module can hang the suite.
"""
import json
import os
import signal
import time
from pathlib import Path

import pytest

from slurm_cluster import TERMINAL_STATES, LocalSlurm, SlurmUnavailable, ensure_installed, port_below_ephemeral
from test_cli import ENTRY

pytestmark = pytest.mark.slow  # launchers and servers: `-m "not slow"` leaves them out

REPO = ENTRY.parent
SBATCH = REPO / "launch" / "slurm.sbatch"
BUDGET_S = 360              # the whole module: apt install, cluster start and every job
INSTALL_TIMEOUT_S = 180     # apt-get update + install; over it, the module is skipped
TINY = ["model=tiny", "width=512", "height=512", "progress=false"]
# README "SLURM": a Hydra folder per job, the same one across requeues (Hydra resolves the job id in each run)
HYDRA_PER_JOB = ["hydra.run.dir=outputs/${oc.env:SLURM_JOB_ID}", "hydra.output_subdir=.hydra", "hydra/job_logging=default"]


class BudgetExceeded(Exception):
    pass


def _on_alarm(signum, frame):
    raise BudgetExceeded(f"tests/test_slurm.py ran past its {BUDGET_S} s budget")


@pytest.fixture(scope="module")
def budget_deadline():
    return time.monotonic() + BUDGET_S


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, budget_deadline):
    t0 = time.monotonic()
    if os.geteuid() != 0:
        pytest.skip("a local SLURM cluster needs root (slurmd runs jobs as their user)")
    try:
        install_s = ensure_installed(timeout=INSTALL_TIMEOUT_S)
    except SlurmUnavailable as exc:
        print(f"SLURM unavailable: {exc}")
        pytest.skip(f"SLURM unavailable: {exc}")
    slurm = LocalSlurm(tmp_path_factory.mktemp("slurm"))
    try:
        start_s = slurm.start(timeout=min(90.0, budget_deadline - time.monotonic()))
        print(f"\nslurm: install {install_s:.1f} s, cluster start {start_s:.1f} s, total {time.monotonic() - t0:.1f} s")
        yield slurm
    finally:
        slurm.stop()


@pytest.fixture(autouse=True)
def _hard_timeout(request):
    """SIGALRM at the module's deadline: a stuck job or daemon fails the test instead of hanging."""
    if "budget_deadline" not in request.fixturenames:
        yield
        return
    left = request.getfixturevalue("budget_deadline") - time.monotonic()
    if left <= 0:
        pytest.fail(f"no time left in tests/test_slurm.py's {BUDGET_S} s budget")
    previous = signal.signal(signal.SIGALRM, _on_alarm)
    signal.setitimer(signal.ITIMER_REAL, left)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def job_env(tiny_cache) -> dict:
    """What the jobs get on top of this environment (--export=ALL,...): 2 CPU ranks, offline, the tiny cache."""
    return {"NPROC_PER_NODE": "2", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "K4FLASH_CACHE": str(tiny_cache),
            "MASTER_PORT": str(port_below_ephemeral())}  # kept across requeues: out of others' way


def job_log(cluster, job_id, cwd) -> str:
    path = Path(cluster.job(job_id).get("StdOut") or Path(cwd) / f"k4flash-{job_id}.log")
    return path.read_text(errors="replace") if path.exists() else f"(no log at {path})"


def explain(cluster, job_id, cwd, info) -> str:
    return (f"job {job_id}: {info}\n===== job log\n{job_log(cluster, job_id, cwd)[-6000:]}\n"
            f"===== daemons\n{cluster.diagnostics()[-4000:]}")


def wait_ok(cluster, job_id, cwd, timeout) -> dict:
    try:
        info = cluster.wait(job_id, timeout=timeout)
    except TimeoutError as exc:
        pytest.fail(f"{exc}\n{explain(cluster, job_id, cwd, cluster.job(job_id))}")
    assert info.get("JobState") == "COMPLETED" and info.get("ExitCode") == "0:0", explain(cluster, job_id, cwd, info)
    return info


def test_single_image_job_on_two_ranks(cluster, tiny_cache, tmp_path):
    """sbatch from a directory outside the repo: the script finds the repo, runs 2 ranks, writes the image."""
    t0 = time.monotonic()
    job = cluster.submit(SBATCH, [*TINY, "time_length=0", "seed=3", "prompt=a red square", "save_path=out/pic.mp4",
                                  *HYDRA_PER_JOB], cwd=tmp_path, export=job_env(tiny_cache))
    info = wait_ok(cluster, job, tmp_path, timeout=240)
    print(f"job {job}: {time.monotonic() - t0:.1f} s from sbatch to COMPLETED")
    log = job_log(cluster, job, tmp_path)
    assert Path(info["StdOut"]) == tmp_path / f"k4flash-{job}.log"
    assert f"repo {REPO}" in log and "1 node(s) x 2 rank(s)" in log and "srun exited with status 0" in log, log
    assert (tmp_path / "out" / "pic.png").exists(), log
    sidecar = json.loads((tmp_path / "out" / "pic.json").read_text())
    assert sidecar["model"] == "tiny" and sidecar["seed"] == 3 and sidecar["prompt"] == "a red square"
    # outputs/<job id>: one folder, rank 0's alone (one "wrote" line in its log), with the resolved config
    assert os.listdir(tmp_path / "outputs") == [job]
    hydra_log = (tmp_path / "outputs" / job / "run_inference_distil.log").read_text()
    assert hydra_log.count("wrote out/pic.png") == 1, hydra_log
    assert "seed: 3" in (tmp_path / "outputs" / job / ".hydra" / "config.yaml").read_text()


# ---------------------------------------------------------------------------------------------
# Batch mode + resume (`prompts_file=` / `output_dir=`): skipped while the app lacks batch mode.
# One batch of 3 prompts is interrupted twice: first as SLURM does before a time limit (USR1 to
# the batch script, whose trap requeues the job: same id, log appended), then by scancel, and is
# then submitted again. Every prompt ends up done once: finished outputs are never rewritten.



def outputs(out_dir: Path) -> dict:
    """index -> (media, sidecar) for each prompt whose media (.mp4 or .png) and JSON sidecar both exist."""
    done = {}
    for sidecar in sorted(out_dir.glob("[0-9][0-9][0-9][0-9][0-9]-*.json")):
        media = [sidecar.with_suffix(ext) for ext in (".mp4", ".png") if sidecar.with_suffix(ext).exists()]
        if media:
            done[int(sidecar.name[:5])] = (media[0], sidecar)
    return done


def identity(path: Path) -> tuple:
    st = path.stat()
    return st.st_ino, st.st_mtime_ns, st.st_size


def wait_for_output(cluster, job_id, cwd, out: Path, index: int, timeout: float) -> None:
    """Poll until prompt `index` is done; fail at once if the job ends first."""
    deadline = time.monotonic() + timeout
    while index not in outputs(out):
        info = cluster.job(job_id)
        assert info.get("JobState") not in TERMINAL_STATES, \
            f"job ended before output {index}\n{explain(cluster, job_id, cwd, info)}"
        if time.monotonic() > deadline:
            pytest.fail(f"no output {index} after {timeout:.0f} s\n{explain(cluster, job_id, cwd, info)}")
        time.sleep(0.2)


def test_batch_job_requeued_cancelled_and_resubmitted_resumes(cluster, tiny_cache, tmp_path):
    prompts = ["a red square on a white wall", "a blue circle in the sky", "a green triangle on the grass"]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")
    # 1 s videos: a prompt takes ~15 s here (decode), so each interruption lands mid-batch.
    args = [*TINY, "time_length=1", "seed=11", "prompts_file=prompts.txt", "output_dir=out", *HYDRA_PER_JOB]
    out = tmp_path / "out"
    t0 = time.monotonic()

    # 1. USR1 to the batch shell after the first video: the trap requeues the job, which restarts.
    job = cluster.submit(SBATCH, args, cwd=tmp_path, export=job_env(tiny_cache))
    wait_for_output(cluster, job, tmp_path, out, 0, timeout=150)
    cluster.run(["scancel", "--batch", "--signal=USR1", job])
    first = {path: identity(path) for path in outputs(out)[0]}
    assert len(outputs(out)) < len(prompts)
    deadline = time.monotonic() + 90
    while cluster.job(job).get("Restarts") != "1":
        assert time.monotonic() < deadline, f"not requeued\n{explain(cluster, job, tmp_path, cluster.job(job))}"
        time.sleep(0.3)
    t_requeued = time.monotonic()

    # 2. The requeued run skips prompt 0 and writes prompt 1; then scancel it.
    wait_for_output(cluster, job, tmp_path, out, 1, timeout=200)  # covers a 120 s requeue delay too
    cluster.cancel(job)
    second = {path: identity(path) for path in outputs(out)[1]}
    info = cluster.wait(job, timeout=60)
    cluster.wait_gone(job, timeout=30)
    log = job_log(cluster, job, tmp_path)
    assert info["JobState"] == "CANCELLED", explain(cluster, job, tmp_path, info)
    assert "signal USR1, requeueing" in log and f"job {job} (restart 1)" in log, log
    assert sorted(outputs(out)) == [0, 1], f"expected prompts 0-1 done at the cancel: {sorted(os.listdir(out))}"
    t_cancelled = time.monotonic()

    # 3. The same command again: only prompt 2 is left.
    again = cluster.submit(SBATCH, args, cwd=tmp_path, export=job_env(tiny_cache))
    wait_ok(cluster, again, tmp_path, timeout=150)
    done = outputs(out)
    assert sorted(done) == [0, 1, 2], (sorted(os.listdir(out)), job_log(cluster, again, tmp_path))
    for index, prompt in enumerate(prompts):
        assert json.loads(done[index][1].read_text())["prompt"] == prompt
    for path, before in {**first, **second}.items():
        assert identity(path) == before, f"{path.name} was rewritten after a restart"
    # outputs/<job id>: the requeued run logged into the first run's folder; the new job has its own
    assert sorted(os.listdir(tmp_path / "outputs")) == sorted([job, again])
    requeued_log = (tmp_path / "outputs" / job / "run_inference_distil.log").read_text()
    assert requeued_log.count("loaded tiny on cpu") == 2 and "wrote out/00001-" in requeued_log, requeued_log
    print(f"batch: first output + requeue {t_requeued - t0:.1f} s, requeued run to cancel {t_cancelled - t_requeued:.1f} s,"
          f" resubmitted job {time.monotonic() - t_cancelled:.1f} s")
