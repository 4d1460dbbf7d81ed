"""Parameter sweeps as config: a grid over an entry's settings becomes ordinary entries.

    sweeps:
      - name: lr_dropout                 # names the sweep (letters, digits, _)
        base: model_10                   # the entry every point starts from
        grid:                            # setting path (dots into dictionaries) -> values
          optimizer.learning_rate: [0.001, 0.0003, 0.0001]
          dropout: [0.25, 0.1]
        seeds: [0, 1]                    # optional; default: the top-level seeds

Each point is an entry ``base: model_10`` plus its settings, named after them
(``model_10__learning_rate-0.0003__dropout-0.1``: safe in file paths and Snakemake wildcards,
stable for the same values), with ``sweep`` and ``sweep_params`` saying where it came from.
It trains, evaluates, resumes and runs on a cluster through the same jobs as any entry; it
is left out of the study's Tables 1-4 and shown in the sweep table instead.
"""

from __future__ import annotations

import copy
import itertools
import re

from .errors import ConfigError

SEP = "__"  # between the base name and each setting: safe in file paths, shells and wildcards


def _nested(path: str, value) -> dict:
    node: dict = {}
    root = node
    *parents, last = path.split(".")
    for key in parents:
        node[key] = {}
        node = node[key]
    node[last] = value
    return root


def _text(value) -> str:
    text = (
        format(value, "g")
        if isinstance(value, float)
        else str(value).lower()
        if isinstance(value, bool)
        else str(value)
    )
    return re.sub(r"[^A-Za-z0-9_.+-]", "_", text)


def point_name(base: str, params: dict) -> str:
    """Readable and stable: the base, then each setting's last path component and value."""
    short = [path.rsplit(".", 1)[-1] for path in params]
    keys = short if len(set(short)) == len(short) else [p.replace(".", "_") for p in params]
    return base + "".join(f"{SEP}{key}-{_text(value)}" for key, value in zip(keys, params.values(), strict=True))


def check_paths(sweeps: list[dict], entry_schema_check) -> None:
    """Every grid path must be a setting a model entry has: ``entry_schema_check(entry)``
    validates a minimal entry (name plus that one setting) and raises ConfigError if not."""
    problems = []
    for i, sweep in enumerate(sweeps):
        for path, values in sweep["grid"].items():
            for value in values:
                try:
                    entry_schema_check({"name": "sweep_point", **_nested(path, value)})
                except ConfigError as exc:
                    detail = str(exc).split("\n", 1)[-1].strip().removeprefix("- ")
                    problems.append(
                        f"sweeps[{i}] ({sweep.get('name', sweep['base'])}).grid: {path!r} is not a setting of a model entry or takes no {value!r} ({detail})"
                    )  # noqa: E501
                    break
    if problems:
        raise ConfigError("invalid config:\n" + "\n".join(f"  - {p}" for p in problems))


def expand(sweeps: list[dict], known: list[str], default_seeds: list[int]) -> list[dict]:
    """The entries of every grid point, in grid order (the last setting varies fastest)."""
    entries, problems = [], []
    for i, sweep in enumerate(sweeps):
        label = sweep.get("name") or sweep["base"]
        if sweep["base"] not in known:
            problems.append(
                f"sweeps[{i}] ({label}): base {sweep['base']!r} is not a model entry (entries: {', '.join(known)})"
            )
            continue
        paths = list(sweep["grid"])
        for values in itertools.product(*(sweep["grid"][p] for p in paths)):
            params = dict(zip(paths, values, strict=True))
            entry: dict = {}
            for path, value in params.items():
                entry = _merge(entry, _nested(path, value))
            entries.append(
                {
                    **entry,
                    "name": point_name(sweep["base"], params),
                    "base": sweep["base"],
                    "note": f"sweep {label}: " + ", ".join(f"{p}={v}" for p, v in params.items()),
                    "seeds": list(sweep.get("seeds") or default_seeds),
                    "sweep": label,
                    "sweep_params": params,
                }
            )
    names = [e["name"] for e in entries]
    clashes = sorted({n for n in names if names.count(n) > 1 or n in known})
    if clashes:
        problems.append(f"sweeps: points named like another entry or point: {', '.join(clashes)}")
    if problems:
        raise ConfigError("invalid config:\n" + "\n".join(f"  - {p}" for p in problems))
    return entries


def _merge(a: dict, b: dict) -> dict:
    out = copy.deepcopy(a)
    for key, value in b.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out
