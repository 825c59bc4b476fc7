"""A real 2-node slurm cluster on this machine, for tests: one munged, one slurmctld, and two
`slurmd -N n1` / `slurmd -N n2` with distinct ports, both nodes at 127.0.0.1.

Everything lives under one private folder (config, state, spool, logs, munge socket and key), so it
never touches a system slurm or munge. Installs Debian's slurm-wlm and munge when missing (root).
Teardown kills exactly the daemons this module started, by PID.

Local-only shortcuts a real cluster does not need: one host plays both nodes (distinct slurmd ports,
NodeAddr=127.0.0.1), SlurmUser=root, proctrack/linuxproc instead of cgroups, no accounting database.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

PACKAGES = ("slurm-wlm", "munge")
NODES = ("n1", "n2")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_installed() -> str | None:
    """None when slurm is usable, else the reason it cannot be."""
    if all(shutil.which(b) for b in ("slurmctld", "slurmd", "munged", "sbatch")):
        return None
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return "slurm-wlm/munge are not installed and cannot be (needs root and apt-get)"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", *PACKAGES]):
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        if p.returncode != 0:
            return f"{' '.join(cmd)} failed: {p.stderr[-500:]}"
    return None


class Cluster:
    def __init__(self, root: Path, cpus_per_node: int = 2):
        self.root = root
        self.cpus = cpus_per_node
        self.pids: list[int] = []
        self.conf = root / "slurm.conf"
        self.munge_socket = root / "munge" / "munge.socket"
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))

    def write_config(self) -> None:
        r = self.root
        for d in ("state", "munge", "log") + tuple(f"spool-{n}" for n in NODES):
            (r / d).mkdir(parents=True, exist_ok=True)
        os.chmod(r / "munge", 0o700)
        key = r / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o400)
        ctl_port = free_port()
        lines = [
            "ClusterName=rmtest",
            f"SlurmctldHost={socket.gethostname()}(127.0.0.1)",
            f"SlurmctldPort={ctl_port}",
            "SlurmUser=root",
            "SlurmdUser=root",
            # cred_expire also sets how long a requeued job waits before it may start again (default
            # 120 s); a test cluster need not wait that long.
            f"AuthInfo=socket={self.munge_socket},cred_expire=10",
            f"StateSaveLocation={r / 'state'}",
            f"SlurmdSpoolDir={r}/spool-%n",
            f"SlurmctldPidFile={r / 'slurmctld.pid'}",
            f"SlurmdPidFile={r}/slurmd-%n.pid",
            f"SlurmctldLogFile={r / 'log' / 'slurmctld.log'}",
            f"SlurmdLogFile={r}/log/slurmd-%n.log",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "MpiDefault=none",
            "SwitchType=switch/none",
            "SchedulerType=sched/builtin",  # schedules on events; backfill waits for its interval
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "ReturnToService=2",
            "JobRequeue=1",
            "KillWait=10",
            "InactiveLimit=0",
            "MinJobAge=600",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
        ]
        for n in NODES:
            lines.append(f"NodeName={n} NodeAddr=127.0.0.1 NodeHostname={socket.gethostname()} "
                         f"Port={free_port()} CPUs={self.cpus} State=UNKNOWN")
        lines.append(f"PartitionName=debug Nodes={','.join(NODES)} Default=YES MaxTime=INFINITE State=UP")
        self.conf.write_text("\n".join(lines) + "\n")

    def _spawn(self, cmd: list[str]) -> int:
        p = subprocess.Popen(cmd, env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
        self.pids.append(p.pid)
        return p.pid

    def start(self, timeout: float = 60) -> None:
        self.write_config()
        r = self.root
        self._spawn(["munged", "-F", "--force", f"--socket={self.munge_socket}",
                     f"--key-file={r / 'munge' / 'munge.key'}", f"--pid-file={r / 'munge' / 'munged.pid'}",
                     f"--log-file={r / 'log' / 'munged.log'}", f"--seed-file={r / 'munge' / 'seed'}"])
        self._wait(lambda: self.munge_socket.exists(), timeout, "munged")
        self._spawn(["slurmctld", "-D", "-c", "-i", "-f", str(self.conf)])
        self._wait(lambda: self.run(["scontrol", "ping"]).returncode == 0, timeout, "slurmctld")
        for n in NODES:
            self._spawn(["slurmd", "-D", "-N", n, "-f", str(self.conf)])
        self._wait(self._nodes_idle, timeout, "slurmd n1/n2")

    def _nodes_idle(self) -> bool:
        out = self.run(["sinfo", "-h", "-N", "-o", "%N %t"]).stdout.split()
        states = dict(zip(out[::2], out[1::2], strict=False))
        return all(states.get(n, "").startswith("idle") for n in NODES)

    def _wait(self, ok, timeout: float, what: str) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if ok():
                return
            time.sleep(0.5)
        logs = "\n".join(f"--- {p.name}\n{p.read_text()[-2000:]}" for p in sorted((self.root / "log").glob("*.log")))
        raise RuntimeError(f"{what} did not come up within {timeout:.0f}s\n{logs}")

    def run(self, cmd: list[str], **kw) -> subprocess.CompletedProcess:
        return subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=kw.pop("timeout", 60),
                              **kw)

    def stop(self) -> None:
        for pid in reversed(self.pids):  # slurmd, slurmctld, then munged: exactly what we started
            try:
                os.killpg(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.time() + 20
        for pid in self.pids:
            while time.time() < deadline:
                try:
                    os.kill(pid, 0)
                    os.waitpid(pid, os.WNOHANG)
                except (ProcessLookupError, ChildProcessError):
                    break
                time.sleep(0.2)
            else:
                try:
                    os.killpg(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        self.pids.clear()
