"""Fetch the CIFAR-10 python archive and extract its files, verified against the official md5s.

The source is an http(s)/ftp URL, a file:// URL or a plain path. Everything is staged in a
temporary directory beside ``outdir`` and moved into place only after every file has passed
its md5 check, so a bad archive leaves no output behind.

    python workflow_scripts/download.py --source URL_OR_PATH --outdir resources/cifar-10-batches-py
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import os
import shutil
import socket
import sys
import tarfile
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import zlib
from pathlib import Path

from cnnstudy import cifar, cli
from cnnstudy.errors import JobError

log = logging.getLogger("cnnstudy.download")


class _Progress:
    """urlretrieve report hook that logs every 10 % (a line per step, readable in a log file)."""

    def __init__(self, url: str):
        self.url = url
        self.next_step = 0

    def __call__(self, blocks: int, block_size: int, total: int) -> None:
        done = blocks * block_size
        if total <= 0:
            if blocks % 2000 == 0:
                log.info("downloaded %.1f MB", done / 1e6)
            return
        percent = min(100, 100 * done // total)
        if percent >= self.next_step:
            log.info("downloaded %3d%% (%.1f of %.1f MB)", percent, done / 1e6, total / 1e6)
            self.next_step = percent - percent % 10 + 10


def local_archive(source: str) -> Path | None:
    """The local file a source names, or None when it is a remote URL."""
    scheme = urllib.parse.urlparse(source).scheme
    if scheme == "file":
        return Path(urllib.request.url2pathname(urllib.parse.urlparse(source).path))
    if scheme in ("http", "https", "ftp"):
        return None
    return Path(source).expanduser()


def fetch(source: str, staging: Path) -> Path:
    """Return a local path to the archive, downloading it into ``staging`` if remote."""
    path = local_archive(source)
    if path is not None:
        if not path.is_file():
            raise FileNotFoundError(
                f"CIFAR-10 archive not found: {path} (from data_source={source!r}); "
                "give an existing path, a file:// URL or an http(s) URL"
            )
        log.info("using local archive %s (%.1f MB)", path, path.stat().st_size / 1e6)
        return path
    target = staging / "cifar-10-python.tar.gz"
    log.info("downloading %s", source)
    socket.setdefaulttimeout(60)
    try:
        urllib.request.urlretrieve(source, target, reporthook=_Progress(source))
    except (urllib.error.URLError, OSError) as exc:
        raise JobError(f"could not download {source}: {exc}") from exc
    return target


def extract_verified(archive: Path, staging: Path, names: set[str]) -> dict[str, str]:
    """Stream the archive once, writing the members in ``names`` into ``staging``; return their md5s."""
    found: dict[str, str] = {}
    try:
        # "r|gz" streams: one pass over the gzip data, which also checks its CRC to the end.
        with tarfile.open(archive, mode="r|gz") as tar:
            for member in tar:
                name = Path(member.name).name
                if member.name != f"{cifar.ARCHIVE_DIR}/{name}" or name not in names:
                    continue
                if not member.isfile():
                    raise JobError(f"{archive}: member {member.name} is not a regular file")
                digest = hashlib.md5()
                with tar.extractfile(member) as src, open(staging / name, "wb") as dst:
                    while chunk := src.read(1 << 20):
                        digest.update(chunk)
                        dst.write(chunk)
                found[name] = digest.hexdigest()
                log.info("extracted %s (%d bytes)", name, member.size)
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise JobError(
            f"{archive}: not a complete gzip-compressed tar archive ({exc}); "
            "it is truncated or corrupt: delete it and download it again"
        ) from exc
    return found


def main(source: str, outdir: str, md5: dict[str, str] | None = None) -> None:
    """Fetch ``source``, verify every member against ``md5`` (default: the official sums)."""
    expected = md5 or cifar.MD5
    out = Path(outdir)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".download-", dir=out.parent))
    try:
        archive = fetch(source, staging)
        found = extract_verified(archive, staging, set(expected))
        missing = [name for name in expected if name not in found]
        if missing:
            raise JobError(
                f"{archive}: missing member(s) {', '.join(f'{cifar.ARCHIVE_DIR}/{m}' for m in missing)}; "
                "is this the CIFAR-10 python version?"
            )
        bad = [
            f"{name}: expected md5 {expected[name]}, got {found[name]}"
            for name in expected
            if found[name] != expected[name]
        ]
        if bad:
            raise JobError(f"{archive}: checksum mismatch:\n  " + "\n  ".join(bad))
        for name in expected:
            log.info("verified %-13s md5 %s", name, found[name])
        out.mkdir(parents=True, exist_ok=True)
        for name in expected:
            os.replace(staging / name, out / name)
        log.info("CIFAR-10 ready in %s", out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


HELP = {
    "source": "URL (http, https, ftp, file) or local path of the archive",
    "outdir": "directory that receives the verified files",
}

if __name__ == "__main__":
    sys.exit(cli.run(main, help=HELP))
