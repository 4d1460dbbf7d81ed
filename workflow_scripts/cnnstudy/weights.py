"""ImageNet weights of keras.applications backbones: Keras' own files, fetched ahead of training.

Compute nodes often have no internet. The ``fetch_weights`` rule downloads, on the head
node, exactly the file Keras itself would (same name, origin and hash) into a cache
directory and writes a small manifest. Training jobs verify the cached file against that
hash and load it from disk; they never reach the network.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from unittest import mock

from .errors import ConfigError, JobError

log = logging.getLogger("cnnstudy.weights")


class _Captured(Exception):
    pass


def keras_source(name: str, input_size: int = 32) -> dict:
    """File name, origin URL and hash Keras uses for ``name``'s ImageNet weights (no top).

    Found by running the constructor with ``keras.utils.get_file`` replaced by a recorder, so
    it holds for every keras.applications model without a hand-kept table. Keras has no public
    way to ask this, and its applications call the private module's get_file, so that is what
    is patched, here only; tests/test_transfer.py fails loudly if Keras moves it.
    """
    from keras.src.utils import file_utils  # private: see above

    from .models import backbone_constructor

    ctor = backbone_constructor(name)
    seen: dict = {}

    def record(fname=None, origin=None, file_hash=None, cache_subdir="datasets", **_):
        seen.update(fname=fname, origin=origin, file_hash=file_hash, cache_subdir=cache_subdir)
        raise _Captured

    with mock.patch.object(file_utils, "get_file", record):
        try:
            ctor(include_top=False, weights="imagenet", input_shape=(input_size, input_size, 3))
        except _Captured:
            pass
        except ValueError as exc:
            raise ConfigError(f"{name} at {input_size}x{input_size} px: {exc}") from exc
    if not seen.get("fname") or not seen.get("origin"):
        raise ConfigError(f"Keras publishes no ImageNet weights file for {name}")
    return {"backbone": name, "fname": seen["fname"], "origin": seen["origin"], "file_hash": seen["file_hash"]}


def file_hash(path: Path, expected: str | None) -> str:
    """The file's hash in the algorithm of ``expected`` (Keras uses md5 or sha256)."""
    algorithm = "md5" if expected and len(expected) == 32 else "sha256"
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, algorithm).hexdigest()


def fetch(name: str, cache_dir: str | Path, input_size: int = 32, mirror: str | None = None) -> dict:
    """Make sure Keras' weights file for ``name`` is in ``cache_dir``; return its manifest."""
    import keras

    source = keras_source(name, input_size)
    cache = Path(cache_dir).resolve()
    target = cache / source["fname"]
    manifest = {**source, "path": str(target)}
    if target.is_file() and file_hash(target, source["file_hash"]) == source["file_hash"]:
        log.info("%s: %s already in the cache, hash ok; nothing downloaded", name, target)
        return manifest
    origin = f"{mirror.rstrip('/')}/{source['fname']}" if mirror else source["origin"]
    log.info("%s: downloading %s", name, origin)
    # get_file quietly falls back to /tmp/.keras when the cache directory does not exist yet.
    cache.mkdir(parents=True, exist_ok=True)
    try:
        got = keras.utils.get_file(
            source["fname"], origin, file_hash=source["file_hash"], cache_dir=str(cache), cache_subdir="."
        )
    except Exception as exc:  # get_file raises bare Exception for network errors, ValueError for bad hashes
        (cache / source["fname"]).unlink(missing_ok=True)
        raise JobError(
            f"{name}: could not fetch ImageNet weights {source['fname']} from {origin}: {exc}. "
            f"On a machine with internet run `snakemake weights`, or copy the file into {cache}."
        ) from exc
    if Path(got).resolve() != target:
        raise JobError(f"{name}: Keras saved the weights to {got}, not {target}: is {cache} writable?")
    log.info("%s: %s (%.1f MB) verified", name, target, target.stat().st_size / 1e6)
    return manifest


def verified_path(manifest: dict) -> str:
    """The cached weights file of a manifest, after checking it is there and intact."""
    path = Path(manifest["path"])
    hint = f"run `snakemake weights --forcerun fetch_weights` to fetch {manifest['fname']} again"
    if not path.is_file():
        raise JobError(f"{manifest['backbone']}: ImageNet weights file {path} is missing; {hint}")
    actual = file_hash(path, manifest["file_hash"])
    if manifest["file_hash"] and actual != manifest["file_hash"]:
        raise JobError(
            f"{manifest['backbone']}: ImageNet weights file {path} is corrupt "
            f"(hash {actual}, expected {manifest['file_hash']}); {hint}"
        )
    return str(path)
