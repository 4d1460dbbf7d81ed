#!/usr/bin/env python3
"""Tell Snakemake how a Grid Engine job stands: prints one of running, success, failed.

Snakemake's generic cluster executor runs ``status.py <jobid>`` for every job it waits on.

* The job is in ``qstat`` (pending, running, suspended, being deleted): running. In an error
  state (``E``, e.g. Eqw: it will never start by itself) it is deleted with qdel: failed.
* It has left qstat: its accounting record (``qacct -j``, the last one) decides: exit_status 0
  and failed 0 is success, anything else failed (qdel gives failed 100 and exit_status 137,
  h_rt overrun exit_status 137 too).
* qacct has no record yet: Grid Engine writes the accounting file a few seconds after a job
  ends (reporting_params flush_time, 15 s by default), so the job counts as running, for at
  most SGE_STATUS_QACCT_WAIT seconds (default 120) from the first such answer; then failed.
* qstat itself fails (qmaster busy or restarting): tried again a few times, then running (the
  job may well be running; Snakemake asks again later).

The first time without a record is kept in .snakemake/gridengine_logs/status/<jobid>.
Standard library only: it runs with whatever python3 the head node has.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import xml.etree.ElementTree as ET

STATE_DIR = os.path.join(".snakemake", "gridengine_logs", "status")
QACCT_WAIT = float(os.environ.get("SGE_STATUS_QACCT_WAIT", "120"))


def log(message: str) -> None:
    print(f"status.py: {message}", file=sys.stderr)


def qstat_state(jobid: str) -> str | None:
    """The job's state letters (qw, r, Eqw, dr...), None if qstat does not list it; raises if qstat fails."""
    proc = subprocess.run(["qstat", "-u", "*", "-xml"], capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        raise RuntimeError(f"qstat failed ({proc.returncode}): {proc.stderr.strip() or proc.stdout.strip()}")
    root = ET.fromstring(proc.stdout)
    for job in root.iter("job_list"):
        if (job.findtext("JB_job_number") or "").strip() == jobid:
            return (job.findtext("state") or "").strip()
    return None


def qacct_record(jobid: str) -> dict | None:
    """The job's last accounting record, None if qacct has none (yet)."""
    proc = subprocess.run(["qacct", "-j", jobid], capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:  # "job id N not found", or no accounting file before the first job ends
        return None
    blocks = [b for b in re.split(r"^=+$", proc.stdout, flags=re.M) if b.strip()]
    if not blocks:
        return None
    fields = {}
    for line in blocks[-1].splitlines():
        key, _, value = line.strip().partition(" ")
        if key:
            fields[key] = value.strip()
    return fields


def leading_int(text: str | None) -> int | None:
    match = re.match(r"\s*(-?\d+)", text or "")
    return int(match[1]) if match else None


def waited_for_qacct(jobid: str) -> float:
    """Seconds since this job was first found in neither qstat nor qacct."""
    os.makedirs(STATE_DIR, exist_ok=True)
    path = os.path.join(STATE_DIR, jobid)
    if not os.path.exists(path):
        with open(path, "w") as fh:
            fh.write(f"{time.time()}\n")
        return 0.0
    try:
        with open(path) as fh:
            return time.time() - float(fh.read().strip())
    except ValueError:
        return 0.0


def forget(jobid: str) -> None:
    try:
        os.remove(os.path.join(STATE_DIR, jobid))
    except FileNotFoundError:
        pass


def status(jobid: str) -> str:
    for attempt in range(3):
        try:
            state = qstat_state(jobid)
            break
        except (RuntimeError, ET.ParseError, subprocess.TimeoutExpired, OSError) as exc:
            log(f"job {jobid}: {exc}")
            if attempt < 2:
                time.sleep(5)
    else:
        return "running"  # state unknown; Snakemake asks again at its next status check

    if state is not None:
        if "E" in state:
            detail = subprocess.run(["qstat", "-j", jobid], capture_output=True, text=True, timeout=60).stdout
            reasons = "; ".join(
                line.strip() for line in detail.splitlines() if line.lstrip().startswith("error reason")
            )
            log(f"job {jobid} is in error state {state} ({reasons or 'see qstat -j ' + jobid}): deleting it")
            subprocess.run(["qdel", jobid], capture_output=True, timeout=60)
            return "failed"
        return "running"

    record = qacct_record(jobid)
    if record is None:
        waited = waited_for_qacct(jobid)
        if waited <= QACCT_WAIT:
            return "running"
        log(f"job {jobid} left qstat {waited:.0f} s ago and qacct has no record of it: failed")
        forget(jobid)
        return "failed"
    forget(jobid)
    failed, exit_status = leading_int(record.get("failed")), leading_int(record.get("exit_status"))
    if failed == 0 and exit_status == 0:
        return "success"
    log(
        f"job {jobid} ({record.get('jobname', '?')}): failed {record.get('failed')}, exit_status {record.get('exit_status')}"
    )
    return "failed"


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: status.py JOBID")
    print(status(sys.argv[1].strip().split(".")[0]))
