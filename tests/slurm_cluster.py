"""A real one-node SLURM cluster on this machine, for the launcher tests.

Everything lives in one folder: its own munge key and socket, slurm.conf, state, spool, logs
and pid files, on ports of its own. It touches no system configuration, so a system SLURM or
munge (if any) keeps running untouched. Debian's `slurm-wlm` and `munge` packages are installed
on first use when missing (root and apt-get only).

    cluster = LocalSlurm(tmp_dir)
    cluster.start()
    job = cluster.submit("launch/slurm.sbatch", ["model=tiny"], cwd=work, export={"NPROC_PER_NODE": "2"})
    info = cluster.wait(job, timeout=180)
    cluster.stop()
"""
from __future__ import annotations

import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from contextlib import closing
from pathlib import Path

SBIN_PATH = "/usr/local/sbin:/usr/sbin:/sbin"
NEEDED = ("sbatch", "squeue", "scontrol", "scancel", "sinfo", "srun", "slurmctld", "slurmd", "munged")
PACKAGES = ("slurm-wlm", "munge")
NODE = "localhost"  # the node's name: always resolves, and torchrun sees it as this machine
TERMINAL_STATES = {"BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED", "NODE_FAIL", "OUT_OF_MEMORY",
                   "PREEMPTED", "TIMEOUT"}


class SlurmUnavailable(RuntimeError):
    """SLURM cannot be installed or started here: the reason is the message."""


def search_path() -> str:
    return os.environ.get("PATH", os.defpath) + os.pathsep + SBIN_PATH


def which(name: str) -> str | None:
    return shutil.which(name, path=search_path())


def missing_tools() -> list[str]:
    return [name for name in NEEDED if which(name) is None]


def ensure_installed(timeout: float = 240.0) -> float:
    """Install Debian's slurm-wlm and munge when any tool is missing; seconds spent (0 if none was).

    Raises SlurmUnavailable with the reason when they are missing and cannot be installed.
    """
    missing = missing_tools()
    if not missing:
        return 0.0
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise SlurmUnavailable(f"missing {', '.join(missing)}, and no root apt-get to install {' '.join(PACKAGES)}")
    start = time.monotonic()
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive", NEEDRESTART_MODE="a")
    steps = (["apt-get", "update", "-q"],
             ["apt-get", "install", "-y", "-q", "--no-install-recommends", "-o", "Dpkg::Options::=--force-confdef",
              "-o", "Dpkg::Options::=--force-confold", *PACKAGES])
    for cmd in steps:
        left = timeout - (time.monotonic() - start)
        try:
            result = subprocess.run(cmd, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                    timeout=max(left, 1))
        except subprocess.TimeoutExpired:
            raise SlurmUnavailable(f"`{' '.join(cmd)}` took over {timeout:.0f} s") from None
        if result.returncode != 0:
            tail = (result.stdout + result.stderr).strip()[-2000:]
            raise SlurmUnavailable(f"`{' '.join(cmd)}` exited {result.returncode}:\n{tail}")
    missing = missing_tools()
    if missing:
        raise SlurmUnavailable(f"installed {' '.join(PACKAGES)} but still missing {', '.join(missing)}")
    return time.monotonic() - start


def free_port() -> int:
    with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_below_ephemeral(low: int = 20000) -> int:
    """A free port below the kernel's ephemeral range. A port a job keeps across a requeue (MASTER_PORT) is free
    while the job waits to restart; an ephemeral one can meanwhile be handed to another test's bind(0) or outgoing
    connection, and the restarted rendezvous then meets a stranger's server (seen under xdist)."""
    first_ephemeral = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    candidates = list(range(low, max(low + 1, first_ephemeral)))
    random.shuffle(candidates)
    for port in candidates:
        with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    return free_port()


def memory_mb() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    return 1024


def _tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError as exc:
        return f"({exc})"


class LocalSlurm:
    """slurmctld + slurmd + munged for one node named `localhost`, all under `root`."""

    def __init__(self, root: str | Path, cpus: int | None = None):
        self.root = Path(root)
        self.cpus = cpus or os.cpu_count() or 1
        self.conf = self.root / "etc" / "slurm.conf"
        self.munge_socket = self.root / "munge" / "munge.socket"
        self.procs: dict[str, subprocess.Popen] = {}
        self.ctld_port = self.slurmd_port = 0

    # -- configuration -------------------------------------------------------------------------
    def env(self, **extra: str) -> dict:
        """The environment for client commands (sbatch, squeue...) and, through --export, the jobs."""
        path = os.path.dirname(sys.executable) + os.pathsep + search_path()  # the jobs run this Python
        # Nothing from an enclosing SLURM job (tests run inside an allocation) may leak into this cluster's.
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_"))}
        return dict(env, SLURM_CONF=str(self.conf), PATH=path, **extra)

    def config_text(self) -> str:
        r = self.root
        # Memory below the machine's: slurmd drains a node that has less than RealMemory.
        mem = max(256, int(memory_mb() * 0.8))
        return "\n".join([
            "ClusterName=k4test",
            f"SlurmctldHost={NODE}(127.0.0.1)",
            f"SlurmctldPort={self.ctld_port}",
            f"SlurmdPort={self.slurmd_port}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            # cred_expire also delays a requeued job's restart (default 120 s); 10 s keeps requeue tests short.
            f"AuthInfo=socket={self.munge_socket},cred_expire=10",
            f"StateSaveLocation={r / 'state'}",
            f"SlurmdSpoolDir={r / 'spool' / 'slurmd.%n'}",
            f"SlurmctldPidFile={r / 'run' / 'slurmctld.pid'}",
            f"SlurmdPidFile={r / 'run' / 'slurmd.%n.pid'}",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            "MailProg=/bin/true",
            "ProctrackType=proctrack/linuxproc",  # no cgroups: works in containers and VMs alike
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "MpiDefault=none",
            "ReturnToService=2",
            "SchedulerType=sched/backfill",
            "SchedulerParameters=sched_interval=2,bf_interval=2",  # start requeued jobs promptly
            "InactiveLimit=0",
            "KillWait=5",          # scancel: SIGTERM, then SIGKILL 5 s later
            "MinJobAge=600",       # keep finished jobs visible to `scontrol show job` for the whole test
            "SlurmdTimeout=60",
            "SlurmctldTimeout=60",
            f"NodeName={NODE} NodeAddr=127.0.0.1 NodeHostname={NODE} CPUs={self.cpus} RealMemory={mem} "
            "State=UNKNOWN",
            "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
            "",
        ])

    # -- daemons -------------------------------------------------------------------------------
    def _spawn(self, name: str, cmd: list[str]) -> None:
        log = open(self.root / "log" / f"{name}.out", "ab")
        self.procs[name] = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                            env=self.env(), start_new_session=True)
        log.close()

    def _check_alive(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                raise SlurmUnavailable(f"{name} exited with status {proc.returncode}\n{self.diagnostics()}")

    def start(self, timeout: float = 60.0) -> float:
        """Start munged, slurmctld and slurmd; wait until the node is idle. Seconds it took."""
        start = time.monotonic()
        for sub in ("etc", "munge", "state", f"spool/slurmd.{NODE}", "run", "log"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(self.root / "munge", 0o700)
        key = self.root / "munge" / "munge.key"
        if not key.exists():
            key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o400)
        self.ctld_port, self.slurmd_port = free_port(), free_port()
        while self.slurmd_port == self.ctld_port:
            self.slurmd_port = free_port()
        self.conf.write_text(self.config_text())

        self._spawn("munged", [which("munged"), "--foreground", "--force", f"--key-file={key}",
                               f"--socket={self.munge_socket}", f"--pid-file={self.root / 'run' / 'munged.pid'}",
                               f"--log-file={self.root / 'log' / 'munged.log'}",
                               f"--seed-file={self.root / 'munge' / 'munged.seed'}"])
        self._wait_for(lambda: self.munge_socket.exists(), "munged's socket", start + timeout)
        # -D: foreground (the pid we hold is the daemon's; its log is its stderr); -i: no state to recover.
        self._spawn("slurmctld", [which("slurmctld"), "-D", "-i", "-f", str(self.conf)])
        self._wait_for(lambda: self._ok(["scontrol", "ping"], "UP"), "slurmctld", start + timeout)
        self._spawn("slurmd", [which("slurmd"), "-D", "-N", NODE, "-f", str(self.conf)])
        self._wait_for(lambda: self.node_state() == "idle", f"node {NODE} idle", start + timeout)
        return time.monotonic() - start

    def _ok(self, cmd: list[str], expect: str) -> bool:
        result = self.run(cmd, check=False, timeout=15)
        return result.returncode == 0 and expect in result.stdout

    def _wait_for(self, ready, what: str, deadline: float) -> None:
        while time.monotonic() < deadline:
            self._check_alive()
            if ready():
                return
            time.sleep(0.3)
        raise SlurmUnavailable(f"timed out waiting for {what}\n{self.diagnostics()}")

    def stop(self) -> None:
        """Cancel every job, stop the daemons this object started (by pid), then end what they left.

        slurmstepd outlives slurmd, so a job still running at the end is cancelled first; any
        process still holding this cluster's SLURM_CONF afterwards (a step daemon, a rank) is ended.
        """
        ctld = self.procs.get("slurmctld")
        if ctld is not None and ctld.poll() is None:
            try:
                queued = self.run(["squeue", "-h", "-o", "%i"], check=False, timeout=15).stdout.split()
                if queued:
                    self.run(["scancel", *queued], check=False, timeout=15)
                    deadline = time.monotonic() + 30
                    while time.monotonic() < deadline and self.run(["squeue", "-h", "-o", "%i"], check=False,
                                                                   timeout=15).stdout.strip():
                        time.sleep(0.5)
            except subprocess.TimeoutExpired:
                pass
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self.procs.get(name)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        self._end_leftovers()

    def leftover_pids(self) -> list[int]:
        """Live processes whose environment names this cluster's slurm.conf (none but its own can)."""
        marker = f"SLURM_CONF={self.conf}".encode()
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                if marker in (entry / "environ").read_bytes().split(b"\0"):
                    pids.append(int(entry.name))
            except OSError:
                continue
        return pids

    def _end_leftovers(self) -> None:
        for sig, pause in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 0.5)):
            pids = self.leftover_pids()
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except OSError:
                    pass
            if pids:
                time.sleep(pause)

    def diagnostics(self) -> str:
        parts = []
        for path in sorted((self.root / "log").glob("*")):
            parts.append(f"--- {path.name}\n{_tail(path)}")
        return "\n".join(parts)

    # -- client commands ----------------------------------------------------------------------
    def run(self, cmd: list[str], check: bool = True, timeout: float = 30, cwd=None,
            **extra_env: str) -> subprocess.CompletedProcess:
        result = subprocess.run(cmd, env=self.env(**extra_env), cwd=cwd, stdin=subprocess.DEVNULL,
                                capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise RuntimeError(f"`{' '.join(cmd)}` exited {result.returncode}: {result.stderr.strip()}")
        return result

    def node_state(self) -> str:
        result = self.run(["sinfo", "-h", "-N", "-n", NODE, "-o", "%t"], check=False, timeout=15)
        return result.stdout.strip() if result.returncode == 0 else ""

    def submit(self, script: str | Path, args: list[str], cwd: str | Path, export: dict | None = None,
               sbatch_args: list[str] = ()) -> str:
        """sbatch --parsable --export=ALL,K=V... [sbatch_args] script args; the job id."""
        exports = ",".join(["ALL", *(f"{k}={v}" for k, v in (export or {}).items())])
        result = self.run(["sbatch", "--parsable", f"--export={exports}", *sbatch_args, str(script), *args],
                          cwd=cwd)
        return result.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict:
        """`scontrol show job -o`'s fields (JobState, ExitCode, StdOut, ...); {} once it is forgotten."""
        result = self.run(["scontrol", "-o", "show", "job", job_id], check=False, timeout=15)
        if result.returncode != 0:
            return {}
        fields = {}
        for key in ("JobState", "Reason", "ExitCode", "StdOut", "Restarts", "NodeList", "RunTime"):
            match = re.search(rf"(?:^| ){key}=(\S*)", result.stdout)
            if match:
                fields[key] = match.group(1)
        return fields

    def wait(self, job_id: str, timeout: float, states=TERMINAL_STATES, poll: float = 0.5) -> dict:
        """Poll until the job is in one of `states`; its fields. TimeoutError past `timeout`."""
        deadline = time.monotonic() + timeout
        info = {}
        while time.monotonic() < deadline:
            self._check_alive()
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            time.sleep(poll)
        raise TimeoutError(f"job {job_id} not in {sorted(states)} after {timeout:.0f} s: {info}")

    def wait_gone(self, job_id: str, timeout: float) -> None:
        """Poll `squeue -j` until the job is no longer queued or running."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            result = self.run(["squeue", "-h", "-j", job_id, "-o", "%T"], check=False, timeout=15)
            if result.returncode == 0 and not result.stdout.strip():
                return
            if result.returncode != 0 and "Invalid job id" in result.stderr:
                return
            time.sleep(0.5)
        raise TimeoutError(f"job {job_id} still in squeue after {timeout:.0f} s")

    def cancel(self, job_id: str) -> None:
        self.run(["scancel", job_id])
