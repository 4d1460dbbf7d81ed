"""A real one-node SLURM cluster on this machine, for the cluster tests.

Debian's slurm-wlm 22.05, munge, slurmdbd and MariaDB; loopback only; every file (keys,
configs, spool, logs, database) lives in one directory, and every daemon started here is
stopped by ``stop()``, also after a failure. TaskPlugin=task/none and
ProctrackType=proctrack/linuxproc need no cgroups; a fake GPU gres lets jobs request
``--gpus``. Accounting (slurmdbd + MariaDB) is required: the Snakemake SLURM plugin checks
job status with ``sacct``.

By hand (as root):  python tests/slurm_cluster.py start DIR   ...   python tests/slurm_cluster.py stop DIR
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

from daemons import Daemons, apt_update

PACKAGES = ["slurm-wlm", "munge", "slurmdbd", "mariadb-server", "slurm-client"]
# Declared, not real (SlurmdParameters=config_overrides): room for the profile's own job
# sizes (8 threads, 16 GB per training job) on a small machine. TensorFlow caps its
# threads at the cores a process may really use.
CPUS = 16
MEMORY_MB = 64000
GPUS = 2  # fake: empty files stand in for the device files
ACCOUNT = "cnnstudy"
SYSTEM_CONF = Path("/etc/slurm/slurm.conf")
PARTITION = "main"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def install() -> None:
    """apt-get the Debian packages if a daemon is missing (CI machines start without them)."""
    needed = ["slurmctld", "slurmd", "slurmdbd", "munged", "mariadbd", "sacct"]
    if all(shutil.which(cmd) or Path(f"/usr/sbin/{cmd}").exists() for cmd in needed):
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    apt_update(env)
    subprocess.run(
        ["apt-get", "install", "-y", "-qq", *PACKAGES], check=True, env=env, capture_output=True, timeout=900
    )


class Cluster(Daemons):
    def __init__(self, root: Path):
        super().__init__(root, {**os.environ, "SLURM_CONF": str(Path(root).resolve() / "slurm.conf")})
        self.host = socket.gethostname().split(".")[0]

    # ---- configuration -----------------------------------------------------------------
    def _write_configs(self) -> None:
        r = self.root
        for sub in ("state", "spool", "log", "db", "munge"):
            (r / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(r / "munge", 0o711)
        self.ports = {name: _free_port() for name in ("ctld", "slurmd", "dbd", "mysql")}
        key = r / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o400)
        self.munge_socket = r / "munge" / "munge.socket"
        auth = f"AuthType=auth/munge\nAuthInfo=socket={self.munge_socket}\n"
        (r / "slurm.conf").write_text(
            f"""ClusterName=cnnstudy
SlurmctldHost={self.host}(127.0.0.1)
SlurmUser=root
SlurmctldPort={self.ports["ctld"]}
SlurmdPort={self.ports["slurmd"]}
{auth}StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
ReturnToService=2
SlurmdParameters=config_overrides
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
GresTypes=gpu
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort={self.ports["dbd"]}
AccountingStoragePass={self.munge_socket}
AccountingStorageTRES=gres/gpu
AccountingStoreFlags=job_comment
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=5
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
MinJobAge=300
KillWait=5
NodeName={self.host} NodeAddr=127.0.0.1 CPUs={CPUS} RealMemory={MEMORY_MB} Gres=gpu:{GPUS} State=UNKNOWN
PartitionName={PARTITION} Nodes={self.host} Default=YES MaxTime=INFINITE State=UP
"""
        )
        # Slurm's gpu plugin counts device files; empty files stand in for /dev/nvidia*.
        (r / "dev").mkdir(exist_ok=True)
        for i in range(GPUS):
            (r / "dev" / f"fakegpu{i}").touch()
        (r / "gres.conf").write_text(
            f"AutoDetect=off\nNodeName={self.host} Name=gpu File={r}/dev/fakegpu[0-{GPUS - 1}]\n"
        )
        dbd = r / "slurmdbd.conf"
        dbd.write_text(
            f"""{auth}DbdHost={self.host}
DbdAddr=127.0.0.1
DbdPort={self.ports["dbd"]}
SlurmUser=root
LogFile={r}/log/slurmdbd.log
PidFile={r}/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort={self.ports["mysql"]}
StorageUser=slurm
StoragePass=slurmpass
StorageLoc=slurm_acct_db
"""
        )
        os.chmod(dbd, 0o600)

    # ---- daemons ---------------------------------------------------------------------------
    def _link_default_config(self) -> None:
        """Point /etc/slurm/slurm.conf at this cluster's config while it runs.

        The Snakemake SLURM job step removes SLURM_CONF from the environment of the srun it
        starts inside each job, so job steps find the config where real nodes keep it.
        An existing real configuration is never replaced.
        """
        link = SYSTEM_CONF
        if link.is_symlink() and not link.resolve().exists():
            link.unlink()  # left over from a killed test run
        if link.exists() or link.is_symlink():
            raise RuntimeError(f"{link} exists: refusing to replace this machine's SLURM configuration")
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(self.root / "slurm.conf")
        self.linked = True

    def start(self, timeout: float = 180) -> Cluster:
        self.root.mkdir(parents=True, exist_ok=True)
        self._write_configs()
        self._link_default_config()
        r = self.root
        sbin = "/usr/sbin"
        self._spawn(
            "munged",
            [
                f"{sbin}/munged",
                "--foreground",
                "--force",
                f"--key-file={r}/munge/munge.key",
                f"--socket={self.munge_socket}",
                f"--pid-file={r}/munge/munged.pid",
                f"--log-file={r}/log/munged.log",
                f"--seed-file={r}/munge/munged.seed",
            ],
        )
        self._wait("munged", lambda: self.munge_socket.exists(), timeout)

        subprocess.run(
            [
                "mariadb-install-db",
                f"--datadir={r}/db",
                "--user=root",
                "--auth-root-authentication-method=normal",
                "--skip-test-db",
            ],
            check=True,
            capture_output=True,
            timeout=timeout,
        )
        self._spawn(
            "mariadbd",
            [
                f"{sbin}/mariadbd",
                "--no-defaults",
                f"--datadir={r}/db",
                f"--socket={r}/mysql.sock",
                f"--port={self.ports['mysql']}",
                "--bind-address=127.0.0.1",
                "--user=root",
                f"--pid-file={r}/mysql.pid",
                "--skip-log-bin",
                "--innodb-buffer-pool-size=64M",
            ],
        )
        mysql = ["mariadb", "--no-defaults", f"--socket={r}/mysql.sock", "-uroot"]
        self._wait("mariadb", lambda: self._ok(*mysql, "-e", "select 1"), timeout)
        sql = (
            "CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurmpass';"
            "GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1'; FLUSH PRIVILEGES;"
        )
        subprocess.run([*mysql, "-e", sql], check=True, capture_output=True, timeout=60)

        self._spawn("slurmdbd", [f"{sbin}/slurmdbd", "-D"])  # reads slurmdbd.conf beside $SLURM_CONF
        self._wait("slurmdbd", lambda: self._ok("sacctmgr", "-i", "list", "cluster"), timeout)
        self._ok("sacctmgr", "-i", "add", "cluster", "cnnstudy")
        # An account for the jobs: the Snakemake plugin checks the one it submits with.
        self._ok("sacctmgr", "-i", "add", "account", ACCOUNT, "cluster=cnnstudy")
        self._ok("sacctmgr", "-i", "add", "user", "root", f"account={ACCOUNT}", "cluster=cnnstudy")
        self._spawn("slurmctld", [f"{sbin}/slurmctld", "-D", "-f", f"{r}/slurm.conf"])
        self._wait("slurmctld", lambda: self._ok("scontrol", "ping"), timeout)
        self._spawn("slurmd", [f"{sbin}/slurmd", "-D", "-f", f"{r}/slurm.conf"])

        def node_idle() -> bool:
            out = subprocess.run(["sinfo", "-h", "-o", "%T"], env=self.env, capture_output=True, text=True).stdout
            return out.strip() in ("idle", "idle*") and "*" not in out

        self._wait("the node to be idle", node_idle, timeout)
        self._wait("accounting", lambda: self._ok("sacct", "-a", "-X", "-n"), timeout)
        return self

    def stop(self) -> None:
        """Stop every daemon this object started, newest first; kill what does not stop."""
        self._stop_daemons()
        if getattr(self, "linked", False) and SYSTEM_CONF.is_symlink():
            SYSTEM_CONF.unlink()
            self.linked = False

    def sacct(self, *fields: str) -> list[dict]:
        out = subprocess.run(
            ["sacct", "-a", "-X", "-P", "-n", "--format=" + ",".join(fields)],
            env=self.env,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        return [dict(zip(fields, line.split("|"), strict=False)) for line in out.splitlines() if line]


if __name__ == "__main__":
    action, root = sys.argv[1], Path(sys.argv[2])
    cluster = Cluster(root)
    if action == "start":
        install()
        cluster.start()
        print(
            f"export SLURM_CONF={root.resolve()}/slurm.conf   # daemons keep running; stop with: {sys.argv[0]} stop {root}"
        )
        for proc in cluster.procs.values():
            proc.wait()
    else:
        for pid_file in ("slurmd.pid", "slurmctld.pid", "slurmdbd.pid", "mysql.pid", "munge/munged.pid"):
            path = root / pid_file
            if path.exists():
                try:
                    os.kill(int(path.read_text().split()[0]), signal.SIGTERM)
                except (ProcessLookupError, ValueError):
                    pass
        if SYSTEM_CONF.is_symlink() and SYSTEM_CONF.resolve() == (root / "slurm.conf").resolve():
            SYSTEM_CONF.unlink()
