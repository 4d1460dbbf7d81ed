"""Load, validate and resolve the workflow configuration.

The Snakefile calls :func:`load` before any job is planned, so a bad config stops the
run with one readable line per problem. Model entries may inherit from an earlier entry
(``base:``) and state only what changes: this is how the study's ladder stays data.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from . import protocols, sweeps
from .errors import ConfigError

SCHEMA_PATH = Path(__file__).resolve().parents[2] / "schemas" / "config.schema.yaml"

# Keys that describe one entry and are never inherited through `base:` (a rung run with three
# seeds does not make the next rung run three).
OWN_KEYS = ("name", "base", "note", "published", "seeds", "compare_to", "claim", "sweep", "sweep_params", "protocol")
# Keys that never change how a model trains (they describe it, place it in the report, or
# matter only at evaluation): changing them retrains nothing.
NOT_FOR_TRAINING = (
    "base",
    "note",
    "published",
    "table",
    "seeds",
    "compare_to",
    "claim",
    "tta",
    "sweep",
    "sweep_params",
)
# Settings added after results were published: left out of the training spec while off, so the
# specs of entries that do not use them (Snakemake's rerun decision, a resumable job's state) stay
# as they were; training reads them with these defaults.
ABSENT_WHEN_OFF = {"alternating_flip": False, "drop_last": False, "protocol": protocols.DEFAULT}
TABLE_OF_ENTRIES = {1: "table1", 2: "table2"}  # an entry's `table` number -> report table


def load_schema(path: Path = SCHEMA_PATH) -> dict:
    with open(path) as fh:
        return yaml.safe_load(fh)


def _format_error(error: jsonschema.ValidationError, instance: dict, root: dict) -> str:
    """One line per error: the config path (with model names) and what is wrong."""
    parts: list[str] = []
    node: Any = instance
    for key in error.absolute_path:
        if isinstance(key, int):
            label = f"[{key}]"
            name = node[key].get("name") if isinstance(node[key], dict) else None
            if name:
                label += f" ({name})"
            parts.append(label)
        else:
            parts.append(("." if parts else "") + str(key))
        node = node[key]
    where = "".join(parts) or "<top level>"
    message = error.message
    if error.validator in ("additionalProperties", "unevaluatedProperties") and isinstance(error.instance, dict):
        allowed = _allowed_properties(error.schema, root)
        unknown = [key for key in error.instance if key not in allowed]
        message = f"unknown key(s) {', '.join(map(repr, unknown))}; allowed: {', '.join(sorted(allowed))}"
    return f"{where}: {message}"


def _allowed_properties(schema: dict, root: dict) -> set[str]:
    """Property names a schema accepts, following local `$ref`s and `allOf`."""
    ref = schema.get("$ref", "")
    if ref.startswith("#/$defs/"):
        return _allowed_properties(root["$defs"][ref.removeprefix("#/$defs/")], root)
    names = set(schema.get("properties", {}))
    for sub in schema.get("allOf", []):
        names |= _allowed_properties(sub, root)
    return names


def _is_echo(error: jsonschema.ValidationError, root: dict) -> bool:
    """An unevaluatedProperties error that only repeats a known property's own failure.

    A property that fails inside `allOf` does not count as evaluated, so the same mistake
    would be reported twice, once as "unexpected". Keep only the precise error.
    """
    if error.validator != "unevaluatedProperties" or not isinstance(error.instance, dict):
        return False
    return set(error.instance) <= _allowed_properties(error.schema, root)


def _set_defaults(validator_class):
    """jsonschema's documented recipe: fill `default` values while validating."""
    validate_properties = validator_class.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for prop, subschema in properties.items():
                if "default" in subschema and prop not in instance:
                    instance[prop] = copy.deepcopy(subschema["default"])
        yield from validate_properties(validator, properties, instance, schema)

    return jsonschema.validators.extend(validator_class, {"properties": set_defaults})


def _scalar(text: str) -> Any:
    """A command-line string as the YAML value it spells, numbers like ``1e-3`` included
    (YAML 1.1, which PyYAML follows, reads those as strings)."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return text
    return value


def coerce_strings(instance: dict, schema: dict) -> dict:
    """Turn strings into numbers, booleans or null where the schema wants those, in place.

    Snakemake's ``--config key={nested: 2}`` passes nested values (and list items) on as
    strings; so does YAML for ``1e-3``. A string is replaced only where it fails a type
    check and reads as a non-string value; whatever still fails is reported by validate().
    """
    validator = jsonschema.validators.validator_for(schema)(schema)
    for _ in range(100):  # each round fixes every reported value; nesting needs a few rounds
        fixed = 0
        for error in validator.iter_errors(instance):
            if error.validator not in ("type", "oneOf", "anyOf") or not isinstance(error.instance, str):
                continue
            value = _scalar(error.instance)
            if isinstance(value, str) or not error.absolute_path:
                continue
            *parents, last = error.absolute_path
            node = instance
            for key in parents:
                node = node[key]
            node[last] = value
            fixed += 1
        if not fixed:
            break
    return instance


def validate(instance: dict, schema: dict, what: str = "config", fill_defaults: bool = True) -> dict:
    """Validate ``instance`` against ``schema``; raise ConfigError listing every problem.

    Command-line strings that spell numbers are read as numbers first (coerce_strings).
    With ``fill_defaults`` the instance is completed in place with the schema's defaults.
    """
    checker, filler = _validators(schema)
    coerce_strings(instance, schema)
    errors = sorted(
        (e for e in checker.iter_errors(instance) if not _is_echo(e, schema)),
        key=lambda e: list(map(str, e.absolute_path)),
    )
    if errors:
        lines = "\n".join(f"  - {_format_error(e, instance, schema)}" for e in errors)
        raise ConfigError(f"invalid {what} ({len(errors)} problem(s)):\n{lines}")
    if fill_defaults:
        filler.validate(instance)
    return instance


_VALIDATORS: dict[int, tuple] = {}


def _validators(schema: dict) -> tuple:
    """The schema's validator and its default-filling twin, made once per schema object (checking
    the schema itself and resolving its $refs is most of the cost; a config validates its entries
    against the same schema 19 times)."""
    cached = _VALIDATORS.get(id(schema))
    if cached is None or cached[0] is not schema:  # the cache holds the schema, so its id stays its own
        base = jsonschema.validators.validator_for(schema)
        base.check_schema(schema)
        cached = _VALIDATORS[id(schema)] = (schema, base(schema), _set_defaults(base)(schema))
    return cached[1], cached[2]


def deep_merge(base: dict, update: dict) -> dict:
    """Dictionaries merge recursively; lists, scalars and null replace."""
    merged = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def apply_overrides(spec: dict, overrides: dict) -> dict:
    """A dictionary refines the same dictionary of the entry (skipped where the entry has none);
    any other value replaces."""
    merged = copy.deepcopy(spec)
    for key, value in overrides.items():
        if isinstance(value, dict):
            if isinstance(merged.get(key), dict):
                merged[key] = apply_overrides(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def resolve_models(config: dict, schema: dict) -> dict[str, dict]:
    """Apply ``base:`` inheritance and ``model_overrides``; return {name: full entry} in order."""
    resolved: dict[str, dict] = {}
    problems: list[str] = []
    for entry in config["models"]:
        name = entry["name"]
        if name in resolved:
            problems.append(f"models: duplicate model name {name!r}")
            continue
        spec: dict = {}
        if "base" in entry:
            if entry["base"] not in resolved:
                known = ", ".join(resolved) or "none"
                problems.append(f"models ({name}): base {entry['base']!r} is not an earlier model (earlier: {known})")
                continue
            spec = {k: v for k, v in resolved[entry["base"]].items() if k not in OWN_KEYS}
        spec = deep_merge(spec, {k: v for k, v in entry.items() if k != "base"})
        if "base" in entry:
            spec["base"] = entry["base"]
        spec = apply_overrides(spec, config.get("model_overrides") or {})
        spec.setdefault("seeds", list(config.get("seeds") or [0]))
        resolved[name] = spec
    if problems:
        raise ConfigError("invalid config:\n" + "\n".join(f"  - {p}" for p in problems))
    resolved, config_name = _named_after_protocol(resolved)

    entry_schema = {"$defs": schema["$defs"], "$ref": "#/$defs/resolved_model"}
    for name, spec in resolved.items():  # every default filled here, once, for every reader
        validate(spec, entry_schema, what=f"model {name} after inheritance", fill_defaults=True)

    selected = config.get("run_models")
    if selected:  # entry names, or sweep names (all of a sweep's points)
        sweep_names = {spec["sweep"] for spec in resolved.values() if spec.get("sweep")}
        unknown = [m for m in selected if m not in resolved and m not in config_name.values() and m not in sweep_names]
        if unknown:
            raise ConfigError(
                f"run_models: unknown model name(s) {', '.join(map(repr, unknown))}; "
                f"known: {', '.join([config_name[n] for n, s in resolved.items() if not s.get('sweep')] + sorted(sweep_names))}"
            )
        resolved = {
            name: spec
            for name, spec in resolved.items()
            if config_name[name] in selected or spec.get("sweep") in selected
        }
    return resolved


def _named_after_protocol(resolved: dict[str, dict]) -> tuple[dict[str, dict], dict[str, str]]:
    """A refit or study entry (by its own setting or model_overrides) named like a sweep point
    over its protocol, so its outputs never overwrite its holdout run's; and each entry's name
    in the config (run_models selects by it)."""
    named, config_name = {}, {}
    for name, spec in resolved.items():
        protocol = protocols.of(spec)
        if protocol != protocols.DEFAULT and not protocols.PART.search(name):
            spec = {**spec, "name": sweeps.point_name(name, {"protocol": protocol})}
        if spec["name"] in named:
            raise ConfigError(
                f"invalid config:\n  - models: {name} under protocol {protocol} is named {spec['name']}, like another entry"
            )
        named[spec["name"]], config_name[spec["name"]] = spec, name
    return named, config_name


def load(config: dict, schema_path: Path = SCHEMA_PATH) -> dict[str, dict]:
    """Validate the whole config (filling defaults in place) and return the resolved models."""
    schema = load_schema(schema_path)
    validate(config, schema)
    entry_schema = {"$defs": schema["$defs"], "$ref": "#/$defs/model_entry"}
    sweeps.check_paths(
        config["sweeps"], lambda entry: validate(entry, entry_schema, "a sweep point", fill_defaults=False)
    )
    points = sweeps.expand(config["sweeps"], [entry["name"] for entry in config["models"]], config["seeds"])
    return resolve_models({**config, "models": [*config["models"], *points]}, schema)


# ---- views of a resolved entry: what every rule and script reads -------------------------


def complete(entries: dict[str, dict]) -> dict[str, dict]:
    """Resolved entries with every default filled, also those written by older code (a study
    run's specs/models.json from before a default existed)."""
    schema = load_schema()
    entry_schema = {"$defs": schema["$defs"], "$ref": "#/$defs/resolved_model"}
    done = copy.deepcopy(entries)
    for name, entry in done.items():
        validate(entry, entry_schema, what=f"model {name}", fill_defaults=True)
    return done


def training_part(entry: dict) -> dict:
    """The part of a resolved entry that training depends on (the train job's spec).

    The test-time augmentation matters to training only where the job records the evaluated
    model's accuracy after every epoch (time_to_accuracy).
    """
    keep = ("tta",) if entry.get("time_to_accuracy") else ()
    part = {k: v for k, v in entry.items() if k not in NOT_FOR_TRAINING or k in keep}
    return {k: v for k, v in part.items() if not (k in ABSENT_WHEN_OFF and v == ABSENT_WHEN_OFF[k])}


def in_study_tables(entry: dict) -> bool:
    """An entry of the study's Tables 1-4 and figures: not a sweep point, and a holdout run
    (refit and study runs have the protocols table)."""
    return not entry.get("sweep") and protocols.of(entry) == protocols.DEFAULT


def in_sweep_table(entry: dict) -> bool:
    """A point of a sweep compared on its validation split (a sweep over `protocol` is not)."""
    return bool(entry.get("sweep")) and protocols.of(entry) == protocols.DEFAULT


def weights_source(entry: dict) -> str:
    """Where the backbone starts from: 'none' (also without a backbone), 'imagenet' or a file path."""
    backbone = entry.get("backbone")
    return backbone["weights"] if backbone else "none"


def flat_layers(items) -> list[dict]:
    """Layer items with blocks (nested lists) expanded, in order."""
    flat: list[dict] = []
    for item in items or []:
        flat.extend(flat_layers(item) if isinstance(item, list) else [item])
    return flat


def report_table(entry: dict) -> str:
    """The report table (registry name, cnnstudy.tables) an entry's row goes to."""
    return TABLE_OF_ENTRIES[entry["table"]]


def spec_hash(spec: dict) -> str:
    """Stable short hash of a resolved model entry (provenance, change detection)."""
    canonical = json.dumps(spec, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]
