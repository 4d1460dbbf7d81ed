"""Real daemons started by a test (a SLURM or Grid Engine cell): spawn, wait, stop, logs."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

_APT_UPDATED = []


def apt_update(env: dict | None = None) -> None:
    """`apt-get update`, once per test session (Chromium, SLURM and Grid Engine each need a
    package on a fresh CI machine; the lists fetched for the first serve the others)."""
    if _APT_UPDATED:
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive", **(env or {})}
    proc = subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"apt-get update failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    _APT_UPDATED.append(True)


class Daemons:
    """Daemons this object started, each in its own session, logging to ``root/log/<name>.out``."""

    def __init__(self, root: Path, env: dict):
        self.root, self.env = Path(root).resolve(), env
        self.procs: dict[str, subprocess.Popen] = {}

    def _spawn(self, name: str, cmd: list[str], **popen) -> None:
        log = open(self.root / "log" / f"{name}.out", "w")
        self.procs[name] = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, **{"env": self.env, **popen}
        )

    def _wait(self, what: str, check, timeout: float = 60) -> None:
        """Poll ``check()`` until true; fail at once, with the logs, if a daemon exits meanwhile."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited ({proc.returncode}) while waiting for {what}:\n{self.logs()}")
            if check():
                return
            time.sleep(0.5)
        raise TimeoutError(f"timed out waiting for {what}:\n{self.logs()}")

    def _ok(self, *cmd: str) -> bool:
        try:
            return subprocess.run(cmd, env=self.env, capture_output=True, timeout=30).returncode == 0
        except subprocess.TimeoutExpired:
            return False

    def _stop_daemons(self) -> None:
        """Stop every daemon this object started, newest first; kill what does not stop in 20 s."""
        for name in reversed(list(self.procs)):
            proc = self.procs[name]
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.time() + 20
        for proc in self.procs.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

    def log_files(self) -> list[Path]:
        return sorted((self.root / "log").glob("*"))

    def logs(self) -> str:
        parts = []
        for path in self.log_files():
            text = path.read_text(errors="replace").splitlines()[-15:]
            parts.append(f"--- {path.relative_to(self.root)}\n" + "\n".join(text))
        return "\n".join(parts)
