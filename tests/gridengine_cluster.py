"""A real one-host Grid Engine cell on this machine, for the Grid Engine profile's tests.

Debian's gridengine 8.1.9 (Son of Grid Engine): sge_qmaster and sge_execd, both run by hand
in the foreground (no init scripts), on free ports, with everything of the cell (SGE_ROOT,
configuration, classic spooling, accounting file, logs) in one directory. ``stop()`` deletes
the cell's jobs, kills what is left of them and stops every daemon started here, also after a
failure. The cell: one queue (all.q) on this host with a parallel environment ``smp``
(allocation_rule $pe_slots), a per-job ``gpu`` consumable (fake: nothing checks the devices) and
no memory enforcement (TensorFlow reserves far more virtual memory than it uses, so h_vmem
limits would kill it); memory requests go to the built-in ``mem_free`` load value. As on many
sites, jobs start in a login shell (shell_start_mode posix_compliant, bash in login_shells), so
a login profile that changes PATH is part of what the profile has to cope with. host_aliases
maps the names this host's address resolves back to (``localhost`` for 127.0.0.1) to its name.

By hand (as root):  python tests/gridengine_cluster.py start DIR   ...   python tests/gridengine_cluster.py stop DIR
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

from daemons import Daemons, apt_update

PACKAGES = ["gridengine-master", "gridengine-exec", "gridengine-client"]
# Declared, not real: room for the profile's own job sizes (8 threads per training job) on
# a small machine, as in the SLURM test. TensorFlow caps its threads at the cores a process
# may really use.
SLOTS = 16
GPUS = 2  # a consumable only: nothing on this machine checks for devices
QUEUE = "all.q"
PE = "smp"
GPU_COMPLEX = "gpu"
CELL = "default"
SGE_LIB = Path("/usr/lib/gridengine")  # Debian's binaries and helpers
SGE_SHARE = Path("/usr/share/gridengine")
POLICY_RC = Path("/usr/sbin/policy-rc.d")
GID_RANGE = (65400, 65500)  # execd gives each job an extra group id from here (found again in stop())


def _installed() -> bool:
    needed = [
        "/usr/sbin/sge_qmaster",
        "/usr/sbin/sge_execd",
        "/usr/bin/qsub",
        "/usr/bin/qstat",
        "/usr/bin/qacct",
        "/usr/bin/qdel",
        "/usr/bin/qconf",
        str(SGE_LIB / "spoolinit"),
        str(SGE_LIB / "spooldefaults"),
    ]
    return all(Path(p).exists() for p in needed)


def install() -> None:
    """apt-get Debian's Grid Engine if it is missing (CI machines start without it).

    The answers debconf would ask for are preseeded; the packages' own cell is not configured
    (this module builds its own), and a temporary policy-rc.d keeps the packages' init scripts
    (and the mail server they pull in) from starting daemons nobody would stop.
    """
    if _installed():
        return
    host = socket.gethostname().split(".")[0]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    answers = "".join(
        f"{owner} shared/{key}\n"
        for owner in ("gridengine-common", "gridengine-client", "gridengine-master", "gridengine-exec")
        for key in (
            "gridengineconfig boolean false",
            f"gridenginemaster string {host}",
            "gridenginecell string default",
        )
    )

    def run(*cmd: str, timeout: float, stdin: str | None = None) -> None:
        proc = subprocess.run(cmd, input=stdin, env=env, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(
                f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
            )

    run("debconf-set-selections", stdin=answers, timeout=60)
    own_policy = not POLICY_RC.exists()
    if own_policy:
        POLICY_RC.write_text("#!/bin/sh\n# written by tests/gridengine_cluster.py during apt-get install\nexit 101\n")
        POLICY_RC.chmod(0o755)
    try:
        apt_update(env)
        run("apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES, timeout=900)
    finally:
        if own_policy:
            POLICY_RC.unlink(missing_ok=True)
    if not _installed():
        raise RuntimeError(f"apt-get installed {PACKAGES} but Grid Engine's programs are still missing")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _set_keys(text: str, values: dict[str, str]) -> str:
    """Replace (or add) ``key value`` lines in a Grid Engine configuration text."""
    lines = text.splitlines()
    for key, value in values.items():
        line = f"{key:<28} {value}"
        idx = [i for i, old in enumerate(lines) if old.split(maxsplit=1)[:1] == [key]]
        if idx:
            lines[idx[0]] = line
        else:
            lines.append(line)
    return "\n".join(lines) + "\n"


class Cluster(Daemons):
    def __init__(self, root: Path):
        sge_root = Path(root).resolve() / "sge"
        self.ports = {"qmaster": _free_port(), "execd": _free_port()}
        super().__init__(
            root,
            {
                **{k: v for k, v in os.environ.items() if not k.startswith("SGE_")},
                "SGE_ROOT": str(sge_root),
                "SGE_CELL": CELL,
                "SGE_QMASTER_PORT": str(self.ports["qmaster"]),
                "SGE_EXECD_PORT": str(self.ports["execd"]),
            },
        )
        self.host = socket.gethostname().split(".")[0]
        self.sge_root = sge_root
        self.common = self.sge_root / CELL / "common"
        # What a client (qsub, qstat, Snakemake and its jobs) needs to find this cell.
        self.client_env = {k: self.env[k] for k in ("SGE_ROOT", "SGE_CELL", "SGE_QMASTER_PORT", "SGE_EXECD_PORT")}

    # ---- configuration -----------------------------------------------------------------
    def _host_aliases(self) -> list[str]:
        """Other names this host's address resolves back to (loopback: often ``localhost``).

        Grid Engine names a connecting daemon or client by a reverse look-up of its address;
        host_aliases maps those names back to the short host name, so that qmaster accepts
        its own host as admin, submit and execution host.
        """
        try:
            address = socket.gethostbyname(self.host)
        except OSError as exc:
            raise RuntimeError(
                f"this host's name {self.host!r} does not resolve ({exc}): Grid Engine needs it "
                f"(add '127.0.0.1 {self.host}' to /etc/hosts)"
            ) from None
        names = {self.host}
        try:
            name, aliases, _ = socket.gethostbyaddr(address)
            names |= {name, *aliases}
        except OSError:
            pass
        return sorted(n.split(".")[0] for n in names if n.split(".")[0] != self.host)

    def _write_cell(self) -> None:
        r = self.root
        for sub in ("log", "spool/qmaster", "spool/execd", "conf"):
            (r / sub).mkdir(parents=True, exist_ok=True)
        self.common.mkdir(parents=True, exist_ok=True)
        for sub in ("util", "utilbin", "lib", "bin"):  # Debian keeps these under its own SGE_ROOT
            link = self.sge_root / sub
            if not link.exists():
                link.symlink_to(Path("/var/lib/gridengine") / sub)
        qmaster_spool = r / "spool" / "qmaster"
        (self.common / "bootstrap").write_text(
            f"""# Version: 8.1.9
admin_user              root
default_domain          none
ignore_fqdn             true
spooling_method         classic
spooling_lib            libspoolc
spooling_params         {self.common};{qmaster_spool}
binary_path             /usr/sbin
qmaster_spool_dir       {qmaster_spool}
security_mode           none
listener_threads        2
worker_threads          2
scheduler_threads       1
"""
        )
        (self.common / "act_qmaster").write_text(f"{self.host}\n")
        (self.common / "host_aliases").write_text(" ".join([self.host, *self._host_aliases()]) + "\n")
        (self.common / "settings.sh").write_text("".join(f"export {k}={v}\n" for k, v in self.client_env.items()))
        global_conf = _set_keys(
            (SGE_SHARE / "default-configuration").read_text(),
            {
                "execd_spool_dir": str(r / "spool" / "execd"),
                "min_uid": "0",  # the tests run as root
                "min_gid": "0",
                "load_report_time": "00:00:05",
                "max_unheard": "00:01:00",
                # Accounting on, written within a few seconds of a job's end (qacct lags by that
                # much: the profile's status script must cope).
                "reporting_params": "accounting=true reporting=false flush_time=00:00:05 joblog=false "
                "sharelog=00:00:00 accounting_flush_time=00:00:05",
                # qdel kills every process of the job, also those in sessions of their own.
                "execd_params": "ENABLE_ADDGRP_KILL=TRUE",
                "gid_range": f"{GID_RANGE[0]}-{GID_RANGE[1]}",
                "mailer": "/bin/true",
                # The jobs' bash (-S /bin/bash) starts as a plain, not a login, shell: qsub -V already
                # gives it the head node's environment, and a login shell's profile may run slow or
                # blocking start-up code (pyenv's rehash waits 60 s on a lock a killed shell left).
                "login_shells": "sh",
            },
        )
        (r / "conf" / "global").write_text(global_conf)
        spool = ["classic", "libspoolc", f"{self.common};{qmaster_spool}", "init"]
        self._check(str(SGE_LIB / "spoolinit"), *spool)
        self._check(str(SGE_LIB / "spooldefaults"), "configuration", str(r / "conf" / "global"))
        self._check(str(SGE_LIB / "spooldefaults"), "complexes", str(SGE_SHARE / "util/resources/centry"))
        self._check(str(SGE_LIB / "spooldefaults"), "usersets", str(SGE_SHARE / "util/resources/usersets"))
        self._check(str(SGE_LIB / "spooldefaults"), "managers", "root")
        self._check(str(SGE_LIB / "spooldefaults"), "adminhosts", self.host)

    def _configure_cluster(self) -> None:
        """Submit host, GPU complex, parallel environment, execution host, queue, scheduler."""
        c = self.root / "conf"
        self._check("qconf", "-as", self.host)
        complexes = self._check("qconf", "-sc")
        # consumable JOB: a job's request counts once, not once per slot of its parallel environment
        line = f"{GPU_COMPLEX:<19} {GPU_COMPLEX:<10} INT       <=    YES         JOB        0        0"
        (c / "complexes").write_text(complexes.rstrip("\n") + "\n" + line + "\n")
        self._check("qconf", "-Mc", str(c / "complexes"))
        (c / "pe").write_text(
            f"pe_name {PE}\nslots 9999\nuser_lists NONE\nxuser_lists NONE\nstart_proc_args NONE\nstop_proc_args NONE\n"
            "allocation_rule $pe_slots\ncontrol_slaves FALSE\njob_is_first_task TRUE\nurgency_slots min\n"
            "accounting_summary FALSE\nqsort_args NONE\n"
        )
        self._check("qconf", "-Ap", str(c / "pe"))
        (c / "host").write_text(
            f"hostname {self.host}\nload_scaling NONE\ncomplex_values {GPU_COMPLEX}={GPUS}\nuser_lists NONE\n"
            "xuser_lists NONE\nprojects NONE\nxprojects NONE\nusage_scaling NONE\nreport_variables NONE\n"
        )
        self._check("qconf", "-Ae", str(c / "host"))
        limits = "".join(
            f"{k} INFINITY\n"
            for k in (
                "s_rt",
                "h_rt",
                "s_cpu",
                "h_cpu",
                "s_fsize",
                "h_fsize",
                "s_data",
                "h_data",
                "s_stack",
                "h_stack",
                "s_core",
                "h_core",
                "s_rss",
                "h_rss",
                "s_vmem",
                "h_vmem",
            )
        )
        # No load thresholds: the machine may be busy with other work; the queue must not alarm.
        (c / "queue").write_text(
            f"qname {QUEUE}\nhostlist {self.host}\nseq_no 0\nload_thresholds NONE\nsuspend_thresholds NONE\n"
            "nsuspend 1\nsuspend_interval 00:05:00\npriority 0\nmin_cpu_interval 00:05:00\nprocessors UNDEFINED\n"
            f"qtype BATCH\nckpt_list NONE\npe_list {PE}\nrerun FALSE\nslots {SLOTS}\ntmpdir /tmp\nshell /bin/bash\n"
            "prolog NONE\nepilog NONE\nshell_start_mode posix_compliant\nstarter_method NONE\nsuspend_method NONE\n"
            "resume_method NONE\nterminate_method NONE\nnotify 00:00:60\nowner_list NONE\nuser_lists NONE\n"
            "xuser_lists NONE\nsubordinate_list NONE\ncomplex_values NONE\nprojects NONE\nxprojects NONE\n"
            f"calendar NONE\ninitial_state default\n{limits}"
        )
        self._check("qconf", "-Aq", str(c / "queue"))
        sched = _set_keys(
            self._check("qconf", "-ssconf"),
            {
                "schedule_interval": "0:0:1",
                "job_load_adjustments": "NONE",
                "load_adjustment_decay_time": "0:0:0",
                "flush_submit_sec": "1",
                "flush_finish_sec": "1",
            },
        )
        (c / "scheduler").write_text(sched)
        self._check("qconf", "-Msconf", str(c / "scheduler"))

    # ---- daemons ---------------------------------------------------------------------------
    def _check(self, *cmd: str, timeout: float = 60) -> str:
        proc = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(
                f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}\n{self.logs()}"
            )
        return proc.stdout

    def _spawn(self, name: str, cmd: list[str], **popen) -> None:
        # SGE_ND: no daemonizing, so this object holds the daemon's process (and stops it).
        super()._spawn(name, cmd, cwd=self.root, env={**self.env, "SGE_ND": "1"})

    def _queue_ready(self) -> bool:
        """The queue instance on this host reports load and has no state flags (u, a, E, d...)."""
        out = subprocess.run(
            ["qstat", "-f", "-q", QUEUE], env=self.env, capture_output=True, text=True, timeout=30
        ).stdout
        for line in out.splitlines():
            fields = line.split()
            if fields and fields[0] == f"{QUEUE}@{self.host}":
                return len(fields) == 5 and fields[3] != "-NA-"
        return False

    def start(self, timeout: float = 120) -> Cluster:
        self.root.mkdir(parents=True, exist_ok=True)
        self._write_cell()
        self._spawn("sge_qmaster", ["/usr/sbin/sge_qmaster"])
        self._wait("sge_qmaster", lambda: self._ok("qconf", "-sh"), timeout)
        self._configure_cluster()
        self._spawn("sge_execd", ["/usr/sbin/sge_execd"])
        self._wait(f"queue {QUEUE}@{self.host} to be ready", self._queue_ready, timeout)
        return self

    def jobs(self) -> list[dict]:
        """This cell's pending and running jobs (all users): id, name, state, slots."""
        out = self._check("qstat", "-u", "*", "-xml")
        return [
            {
                key: (job.findtext(tag) or "").strip()
                for key, tag in (("id", "JB_job_number"), ("name", "JB_name"), ("state", "state"), ("slots", "slots"))
            }
            for job in ET.fromstring(out).iter("job_list")
        ]

    def job_ids(self) -> list[str]:
        return [job["id"] for job in self.jobs()]

    def _job_gids(self) -> set[int]:
        """The extra group ids this cell's execd gave its running jobs (one per job)."""
        gids = set()
        for path in (self.root / "spool" / "execd").glob("*/active_jobs/*/addgrpid"):
            try:
                gids.add(int(path.read_text().split()[0]))
            except (OSError, ValueError, IndexError):
                pass
        return gids

    def _job_pids(self, gids: set[int]) -> list[int]:
        """Processes of this cell's jobs: below its sge_execd, or holding one of its jobs' group ids
        (a job's processes in sessions of their own are no longer below execd)."""
        execd = self.procs.get("sge_execd")
        parents: dict[int, int] = {}
        pids = set()
        for status in Path("/proc").glob("[0-9]*/status"):
            try:
                text = status.read_text()
            except OSError:
                continue
            pid = int(status.parent.name)
            ppid = re.search(r"^PPid:[ \t]*(\d+)", text, re.M)
            parents[pid] = int(ppid[1]) if ppid else 0
            groups = re.search(r"^Groups:[ \t]*([\d \t]*)$", text, re.M)
            if groups and gids & {int(g) for g in groups[1].split()}:
                pids.add(pid)
        if execd is not None:
            for pid in parents:
                p, seen = pid, 0
                while p in parents and p > 1 and seen < 64:
                    if parents[p] == execd.pid:
                        pids.add(pid)
                        break
                    p, seen = parents[p], seen + 1
        return sorted(pids - {os.getpid()})

    def stop(self) -> None:
        """Delete the cell's jobs, kill what is left of them, stop both daemons (newest first)."""
        try:
            self._end_jobs()
        except Exception as exc:  # noqa: BLE001 - whatever went wrong, the daemons are stopped below
            print(f"gridengine_cluster: ending the cell's jobs failed: {exc!r}", file=sys.stderr)
        finally:
            self._stop_daemons()

    def _end_jobs(self) -> None:
        gids = self._job_gids()  # before qdel: execd forgets them with the job
        qmaster = self.procs.get("sge_qmaster")
        if qmaster is None or qmaster.poll() is None:
            jobs = self.job_ids()
            if jobs:
                subprocess.run(["qdel", "-f", *jobs], env=self.env, capture_output=True, timeout=30)
                deadline = time.time() + 15
                while self.job_ids() and time.time() < deadline:
                    time.sleep(0.5)
        for pid in self._job_pids(gids):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def log_files(self) -> list[Path]:
        return super().log_files() + sorted((self.root / "spool").glob("**/messages"))

    def qacct(self) -> list[dict]:
        """Every finished job in the accounting file, one dict per record (qacct's field names)."""
        proc = subprocess.run(["qacct", "-j"], env=self.env, capture_output=True, text=True, timeout=60)
        records = []
        for block in proc.stdout.split("=" * 62):
            fields = dict(line.split(None, 1) for line in block.strip().splitlines() if len(line.split(None, 1)) == 2)
            if "jobnumber" in fields:  # (before the first job ends, qacct prints an error instead)
                records.append({k: v.strip() for k, v in fields.items()})
        return records


if __name__ == "__main__":
    action, root = sys.argv[1], Path(sys.argv[2])
    if action == "start":
        install()
        cluster = Cluster(root)
        cluster.start()
        print(f". {cluster.common / 'settings.sh'}   # daemons keep running; stop with: {sys.argv[0]} stop {root}")
        for proc in cluster.procs.values():
            proc.wait()
    else:  # stop what "start" left running: the cell's jobs, then both daemons
        cluster = Cluster(root)
        settings = cluster.common / "settings.sh"
        cluster.env.update(re.findall(r"export (\w+)=(.*)", settings.read_text()))
        cluster.stop()  # no daemon processes held here: this deletes and kills the jobs
        subprocess.run(["qconf", "-ke", "all"], env=cluster.env, timeout=30)
        subprocess.run(["qconf", "-km"], env=cluster.env, timeout=30)
