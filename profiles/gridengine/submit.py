#!/usr/bin/env python3
"""Submit one Snakemake job script to Grid Engine; print the Grid Engine job id.

Snakemake's generic cluster executor runs ``submit.py <jobscript>``. The job's threads,
resources and wildcards are read from the ``# properties = {...}`` line Snakemake writes into
every job script, and become qsub options:

  threads           -pe <sge_pe> <threads>         (one slot, no -pe, for one thread)
  mem_mb            -l <sge_mem>=<mem_mb/threads>M  per slot, for each complex in sge_mem
  runtime (minutes) -l h_rt=HH:MM:SS
  gpu               -l <sge_gpu>=<gpu>              only if the site setting sge_gpu is not none
  sge_queue         -q <sge_queue>                  only if not none
  sge_args          further qsub options, verbatim (in config.yaml: set-resources: train: sge_args: "'-P myproject'")

plus -V (the head node's environment: the same python), -cwd, -S /bin/bash, a job name
smk.<rule>.<wildcards>, and -j y -o .snakemake/gridengine_logs/<rule>/<name>.<jobid>.log.
The site settings (sge_queue, sge_pe, sge_mem, sge_gpu) are resources set in config.yaml.

The job script goes to qsub on stdin, with one line added: ``export PATH=<this PATH>``. Grid
Engine starts bash as a login shell where the cell lists it in login_shells (the default),
and a login profile (pyenv, conda, modules) may put another python first on PATH; the rules'
``python`` must be the one Snakemake runs with.
``submit.py --dry-run <jobscript>`` prints the qsub command instead of running it.
Standard library only: it runs with whatever python3 the head node has.
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import subprocess
import sys

LOG_DIR = os.path.join(".snakemake", "gridengine_logs")
UNSET = ("", "none", "None", "NONE", "null")


def job_properties(jobscript: str) -> dict:
    with open(jobscript) as fh:
        for line in fh:
            if line.startswith("# properties = "):
                return json.loads(line[len("# properties = ") :])
    sys.exit(f"submit.py: {jobscript} has no '# properties = ' line (not a Snakemake job script?)")


def setting(resources: dict, key: str) -> str | None:
    value = resources.get(key)
    return None if value is None or str(value).strip() in UNSET else str(value).strip()


def number(resources: dict, key: str) -> float:
    value = resources.get(key)
    try:
        return float(value) if value is not None else 0.0
    except (TypeError, ValueError):
        sys.exit(f"submit.py: resource {key}={value!r} is not a number")


def safe(text: str) -> str:
    """Grid Engine job names and file names: no '/', ':', '@', '\\', '*', '?', spaces."""
    return re.sub(r"[^A-Za-z0-9_.+=-]+", "_", text)


def qsub_command(props: dict) -> list[str]:
    resources = props.get("resources", {}) or {}
    threads = max(1, int(props.get("threads", 1) or 1))
    if props.get("type") == "group":
        rule = f"group_{props.get('groupid', 'job')}"
        wildcards = []
    else:
        rule = props.get("rule", "job")
        wildcards = [str(v) for v in (props.get("wildcards") or {}).values()]
    name = safe(".".join(["smk", rule, *wildcards]))[:200]
    log_dir = os.path.join(LOG_DIR, safe(rule))
    os.makedirs(log_dir, exist_ok=True)  # Grid Engine does not create it; a job whose -o fails hangs in Eqw
    cmd = [
        "qsub",
        "-terse",
        "-V",
        "-cwd",
        "-S",
        "/bin/bash",
        "-N",
        name,
        "-j",
        "y",
        "-o",
        os.path.join(log_dir, f"{name}.$JOB_ID.log"),
    ]

    queue = setting(resources, "sge_queue")
    if queue:
        cmd += ["-q", queue]
    pe = setting(resources, "sge_pe")
    slots = threads if pe else 1
    if pe and threads > 1:
        cmd += ["-pe", pe, str(threads)]

    requests = []
    runtime = number(resources, "runtime")
    if runtime > 0:
        seconds = math.ceil(runtime * 60)
        requests.append(f"h_rt={seconds // 3600:02d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}")
    mem_mb = number(resources, "mem_mb")
    memory = setting(resources, "sge_mem")
    if memory and mem_mb > 0:
        per_slot = math.ceil(mem_mb / slots)
        requests += [f"{complex_}={per_slot}M" for complex_ in memory.split(",") if complex_.strip()]
    gpu_complex = setting(resources, "sge_gpu")
    gpus = int(number(resources, "gpu"))
    if gpu_complex and gpus > 0:
        requests.append(f"{gpu_complex}={gpus}")
    if requests:
        cmd += ["-l", ",".join(requests)]

    extra = setting(resources, "sge_args")
    if extra:
        cmd += shlex.split(extra)
    return cmd


def with_path(script: str) -> str:
    """The job script with this process's PATH restored after its '# properties' line."""
    lines = script.splitlines(keepends=True)
    at = next((i + 1 for i, line in enumerate(lines) if line.startswith("# properties = ")), 1)
    restore = f"export PATH={shlex.quote(os.environ.get('PATH', ''))}  # submit.py: the submit host's PATH\n"
    return "".join(lines[:at] + [restore] + lines[at:])


def main(argv: list[str]) -> int:
    dry_run = "--dry-run" in argv
    args = [a for a in argv if a != "--dry-run"]
    if len(args) != 1:
        sys.exit("usage: submit.py [--dry-run] JOBSCRIPT")
    jobscript = args[0]
    cmd = qsub_command(job_properties(jobscript))
    if dry_run:
        print(f"{shlex.join(cmd)} < {shlex.quote(jobscript)}")
        return 0
    with open(jobscript) as fh:
        script = with_path(fh.read())
    proc = subprocess.run(cmd, input=script, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(f"submit.py: {shlex.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}")
        return proc.returncode
    jobid = proc.stdout.strip().splitlines()[0].split(".")[0] if proc.stdout.strip() else ""
    if not jobid.isdigit():
        sys.stderr.write(f"submit.py: qsub printed no job id:\n{proc.stdout}{proc.stderr}")
        return 1
    print(jobid)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
