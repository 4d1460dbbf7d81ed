"""Training protocols: which images a run trains on, what it stops on, how it is read.

    holdout  (default, the published runs) train on the training split (90 %), validate and
             early-stop on the held-out validation split; the test set is used once, at the end.
    refit    train from scratch on all training images (train + validation split) for the epoch
             count its holdout run kept (chosen on the validation split; an entry without early
             stopping: its configured epochs), no early stopping, the schedules set as for the
             holdout run; evaluated once on the test set. It has no validation metrics.
    study    the study's own method: train on all training images, validate on the test set and
             early-stop on it where the entry early-stops. Its numbers are test-selected.

An entry's ``protocol`` setting picks one; a non-holdout entry is named after it like a sweep
point (``model_10__protocol-refit``, configuration.resolve_models), so it never shares outputs
with its holdout run, whose name is the same without that part (holdout_name).
"""

from __future__ import annotations

import re

import numpy as np

from .errors import JobError

PROTOCOLS = ("holdout", "refit", "study")
DEFAULT = "holdout"
PART = re.compile(r"__protocol-[a-z]+")
# What each protocol trains on and chooses its epochs on: the tables' words.
TRAINS_ON = {"holdout": "training split (90 %)", "refit": "all training images", "study": "all training images"}
EPOCHS_CHOSEN_ON = {"holdout": "validation split", "refit": "validation split (its holdout run)", "study": "test set"}


def of(entry: dict) -> str:
    return entry.get("protocol", DEFAULT)


def holdout_name(name: str) -> str:
    """The entry a protocol's entry derives from: its name without ``__protocol-<p>``."""
    return PART.sub("", name)


def holdout_spec(spec: dict) -> dict:
    """The training spec of a refit or study entry's holdout run (what its metrics must vouch for)."""
    holdout = {k: v for k, v in spec.items() if k != "protocol"}
    return {**holdout, "name": holdout_name(spec["name"])}


def vouches(metrics: dict, spec_hash: str) -> bool:
    """Whether a holdout run's metrics were trained, or verified (verify_published), with this spec."""
    provenance = metrics.get("provenance") or {}
    hashes = {provenance.get("spec_hash")} | {v.get("spec_hash") for v in provenance.get("verified") or []}
    return spec_hash in hashes


def refit_epochs(metrics: dict, holdout_hash: str, source: str) -> int:
    """The epoch count a refit trains for: its holdout run's kept epoch."""
    if not vouches(metrics, holdout_hash):
        raise JobError(
            f"{source} was trained with another training spec than this refit's holdout run "
            f"({holdout_hash}): its kept epoch does not apply"
        )
    return int(metrics["kept_epoch"]["epoch"])


def fit_spec(spec: dict) -> dict:
    """The spec training runs: a refit never stops early."""
    return {**spec, "early_stopping": None} if of(spec) == "refit" else spec


def splits(arrays, protocol: str, with_test: bool):
    """(train, val, test) of a preprocessed .npz under ``protocol``: images with one-hot labels
    for train and val (None: no validation), test as images with integer labels (or None)."""
    if protocol not in PROTOCOLS:
        raise JobError(f"unknown protocol {protocol!r}; known: {', '.join(PROTOCOLS)}")
    train, val = (arrays["x_train"], arrays["y_train"]), (arrays["x_val"], arrays["y_val"])
    # The test images are read only where they are used (an .npz member is read when indexed).
    test = (arrays["x_test"], arrays["labels_test"]) if with_test or protocol == "study" else None
    if protocol == "holdout":
        return train, val, test
    everything = (np.concatenate([train[0], val[0]]), np.concatenate([train[1], val[1]]))
    if protocol == "refit":
        return everything, None, test
    one_hot = np.eye(train[1].shape[1], dtype=train[1].dtype)[test[1]]
    return everything, (test[0], one_hot), test if with_test else None
