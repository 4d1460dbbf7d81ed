"""The workflow as Snakemake sees it, without training: dry runs, lint, format."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import typing

import pytest

from conftest import BIN, REPO, early, pins, snakemake, until_session_end


def _jobs(dry_run_output: str) -> dict[str, int]:
    """The 'Job stats' table of a dry run as {rule: count}."""
    table = dry_run_output.split("Job stats:")[1]
    return {m[1]: int(m[2]) for m in re.finditer(r"^(\w+)\s+(\d+)$", table, re.M) if m[1] != "total"}


def test_dry_run_plans_the_whole_dag(tmp_path):
    proc = snakemake("-n", "--directory", str(tmp_path), "--config", "data_source=/some/where/cifar.tar.gz")
    jobs = _jobs(proc.stdout)
    assert jobs["download"] == 1 and jobs["preprocess"] == 1 and jobs["all"] == 1


def test_bad_config_stops_before_any_job(tmp_path):
    proc = snakemake("-n", "--directory", str(tmp_path), "--config", "val_fraction=2", "seeds=[-1]", check=False)
    assert proc.returncode != 0
    output = proc.stdout + proc.stderr
    assert "val_fraction: 2 is greater than or equal to the maximum of 1" in output
    assert "seeds[0]: " in output  # the --config parser passes [-1] on as the string "-1"
    assert not (tmp_path / "results").exists()


def test_unknown_model_name_stops_the_run(tmp_path):
    proc = snakemake("-n", "--directory", str(tmp_path), "--config", "run_models=[model_42]", check=False)
    assert proc.returncode != 0
    assert "run_models: unknown model name(s) 'model_42'" in proc.stdout + proc.stderr


def test_snakemake_lint_is_clean():
    proc = snakemake("--lint", check=False)
    assert proc.returncode == 0 and "Congratulations" in proc.stdout + proc.stderr, proc.stdout + proc.stderr


def test_snakefmt_check_is_clean():
    proc = subprocess.run([str(BIN / "snakefmt"), "--check", "."], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_ruff_check_and_format_are_clean():
    """The Python linter, with the rules pyproject.toml selects (pyflakes, isort, bugbear, ...),
    and its formatter: every file as `ruff format` writes it."""
    for command in (["check", "."], ["format", "--check", "."]):
        proc = subprocess.run([str(BIN / "ruff"), *command], cwd=REPO, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout + proc.stderr


def test_nested_command_line_overrides_are_read_as_numbers(tmp_path):
    """Snakemake passes nested --config values on as strings; YAML reads 1e-3 as one."""
    config = [
        "--config",
        "data_source=/x.tar.gz",
        "run_models=[model_10]",
        "model_overrides={epochs: 2, optimizer: {learning_rate: 1e-3}, dropout: 0.1}",
    ]
    proc = snakemake("-n", "--directory", str(tmp_path), *config)
    assert "train" in proc.stdout
    snakemake("results/specs/model_10.json", "--directory", str(tmp_path), "--cores", "1", *config)  # a local rule
    spec = json.loads((tmp_path / "results/specs/model_10.json").read_text())
    assert spec["epochs"] == 2 and spec["optimizer"]["learning_rate"] == 0.001 and spec["dropout"] == 0.1


def test_entries_train_their_own_seeds(tmp_path):
    config = ["--config", "data_source=/x.tar.gz", "run_models=[model_09,model_10]"]
    proc = snakemake("-n", "--directory", str(tmp_path), *config)
    trained = re.findall(r"wildcards: model=(\w+), seed=(\d+)", proc.stdout)
    models = {(m, int(s)) for m, s in trained}
    assert {("model_10", 0), ("model_10", 1), ("model_10", 2), ("model_09", 0)} <= models
    assert ("model_09", 1) not in models  # seeds are not inherited through base:


def test_verify_published_plans_one_job_per_published_run_only_when_asked(tmp_path):
    (tmp_path / "reports").mkdir()
    (tmp_path / "reports" / "study").symlink_to(REPO / "reports" / "study")
    published = len(list((REPO / "reports" / "study" / "metrics").glob("*_seed*.json")))
    # As `make verify-published` plans it: the published refit and study runs are the protocols preset's entries.
    protocols = ("--configfile", str(REPO / "presets" / "protocols.yaml"), "--config", "run_models=null")
    jobs = _jobs(
        snakemake("-n", "verify_published", "--directory", str(tmp_path), *protocols, "data_source=/x.tar.gz").stdout
    )
    assert jobs["verify_run"] == published and jobs["spec"] == len({p.split("_seed")[0] for p in _published(REPO)})
    chosen = "verify={runs: [model_09_seed0, model_17_seed0], epochs: 1}"
    proc = snakemake(
        "-n", "verify_published", "--directory", str(tmp_path), "--config", "data_source=/x.tar.gz", chosen
    )
    assert _jobs(proc.stdout)["verify_run"] == 2 and "epochs_1.json" in proc.stdout
    # Other targets never read the published runs: a run of one entry plans as before.
    snakemake("-n", "--directory", str(tmp_path), "--config", "data_source=/x.tar.gz", "run_models=[model_10]")
    proc = snakemake(
        "-n",
        "verify_published",
        "--directory",
        str(tmp_path),
        "--config",
        "data_source=/x.tar.gz",
        "run_models=[model_10]",
        check=False,
    )
    assert proc.returncode != 0 and "not in this config's models" in proc.stdout + proc.stderr


def _published(repo) -> list[str]:
    return [p.stem for p in (repo / "reports" / "study" / "metrics").glob("*_seed*.json")]


def test_the_readme_layout_names_every_folder_profile_and_script():
    """The README's layout block names every top-level folder in git and every profile; the scripts
    in workflow_scripts/ are the rules' (rules/*.smk), the tools in tools/ those the layout lists, and
    no script or tool imports another (what they share lives in cnnstudy)."""
    readme = (REPO / "README.md").read_text()
    layout = readme.split("## Layout", 1)[1].split("```")[1]
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    folders = {path.split("/")[0] for path in tracked if "/" in path}
    assert folders, "git ls-files listed nothing"
    assert [f for f in sorted(folders) if f"{f}/" not in layout] == []
    profiles = re.search(r"^profiles/\s+(.*)$", layout, re.M)[1]
    assert [p.name for p in (REPO / "profiles").iterdir() if p.is_dir() and p.name not in profiles] == []
    used = set(re.findall(r'script\("(\w+\.py)"\)', "".join(p.read_text() for p in (REPO / "rules").glob("*.smk"))))
    tools = set(re.search(r"on-demand tools\s+([\w, ]+)", layout)[1].replace(",", " ").split())
    scripts = {p.name for p in (REPO / "workflow_scripts").glob("*.py")}
    assert scripts == used, (scripts - used, used - scripts)
    assert {p.name for p in (REPO / "tools").glob("*.py")} == {f"{t}.py" for t in tools}, tools
    names = {p.stem for folder in ("workflow_scripts", "tools") for p in (REPO / folder).glob("*.py")}
    for path in [*(REPO / "workflow_scripts").glob("*.py"), *(REPO / "tools").glob("*.py")]:
        imported = set(re.findall(r"^\s*(?:import|from) (\w+)", path.read_text(), re.M))
        assert not imported & names, (
            f"{path.name} imports {sorted(imported & names)}: move what they share into cnnstudy"
        )


# The modules where private Keras has no public way, each one concern, each with a comment at the
# use and a test that fails loudly on a Keras upgrade: the weight-file URLs (test_transfer), the
# EMA variables (test_resume), the optimizer's variable index and weight decay (test_speed).
PRIVATE_KERAS = {"weights.py", "predict.py", "optimizers.py"}


def test_private_members_are_used_only_where_they_are_defined_outside_three_modules():
    """Resume and the rest of cnnstudy stand on public Keras: outside PRIVATE_KERAS, every
    ``x._name`` a module reads names something that module defines itself (a function or an
    attribute it assigns on ``self``), never a Keras internal such as ``model._initial_epoch``, and
    nothing is imported from ``keras.src``."""
    import ast

    found = {}
    for path in sorted([*(REPO / "workflow_scripts").rglob("*.py"), *(REPO / "tools").glob("*.py")]):
        if path.name in PRIVATE_KERAS:
            continue
        tree = ast.parse(path.read_text())
        own = {n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
        own |= {
            t.attr
            for n in ast.walk(tree)
            if isinstance(n, (ast.Assign, ast.AnnAssign))
            for t in (n.targets if isinstance(n, ast.Assign) else [n.target])
            if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "self"
        }
        private = {
            n.attr
            for n in ast.walk(tree)
            if isinstance(n, ast.Attribute) and n.attr.startswith("_") and not n.attr.startswith("__")
        }
        private -= own
        private |= {
            f"import {n.module}"
            for n in ast.walk(tree)
            if isinstance(n, ast.ImportFrom) and (n.module or "").startswith("keras.src")
        }
        if private:
            found[str(path.relative_to(REPO))] = sorted(private)
    assert not found, f"private members of other code (Keras?) outside {sorted(PRIVATE_KERAS)}: {found}"


def _planned_commands(tmp_path) -> list[list[str]]:
    """Every job script command the workflow plans (dry runs, -p): the study with the benchmark
    and a verification (default config), and the refit and study runs (presets/protocols.yaml)."""
    import shlex

    (tmp_path / "reports").mkdir()
    (tmp_path / "reports" / "study").symlink_to(REPO / "reports" / "study")
    dry = ["-n", "-p", "--directory", str(tmp_path), "--config", "data_source=/x.tar.gz"]
    out = snakemake("all", "benchmark", "verify_published", *dry, "verify={runs: [model_09_seed0], epochs: 1}").stdout
    out += snakemake("all", *dry[:-2], "--configfile", str(REPO / "presets" / "protocols.yaml"), *dry[-2:]).stdout
    return [
        shlex.split(line.split("Shell command: ", 1)[1].split(" > ")[0])
        for line in out.splitlines()
        if line.startswith("Shell command: python ")
    ]


def test_every_planned_command_is_its_scripts_main(tmp_path):
    """A rule's command passes exactly the arguments of its script's main(): the command line is
    derived from main's signature (cnnstudy.cli.parser_for), so a flag the rule passes that main
    lacks, a required argument it forgets or a value outside main's choices fails here. The local
    rules that call their script from a run: block (download, fetch_weights) are read from the rules."""
    import importlib
    import inspect

    from cnnstudy import cli

    def parse(script: str, argv: list[str]) -> dict:
        module = importlib.import_module(script)
        try:
            return vars(cli.parser_for(module.main, getattr(module, "HELP", None)).parse_args(argv))
        except SystemExit:
            raise AssertionError(f"{script}.py does not take: {shlex.join(argv)}") from None

    import shlex

    commands = _planned_commands(tmp_path)
    scripts = {}
    for python, path, *argv in commands:
        assert python == "python" and path.startswith(str(REPO / "workflow_scripts")), path
        name = path.rsplit("/", 1)[1].removesuffix(".py")
        scripts[name] = parse(name, argv)
    assert set(scripts) == {
        "train",
        "evaluate",
        "preprocess",
        "report",
        "plots",
        "track",
        "benchmark",
        "verify_published",
    }
    assert any("--epochs-from" in c for c in commands) and any("--weights-manifest" in c for c in commands)
    rules = (REPO / "rules" / "data.smk").read_text() + (REPO / "rules" / "train.smk").read_text()
    for name in ("download", "fetch_weights"):
        block = rules.split(f'script("{name}.py")')[1].split("\nrule ")[0]
        flags = {flag.replace("-", "_") for flag in re.findall(r"--([a-z][\w-]*)", block)}
        params = inspect.signature(importlib.import_module(name).main).parameters
        required = {n for n, p in params.items() if p.default is inspect.Parameter.empty}
        assert required <= flags <= set(params), (name, flags, list(params))


def test_a_scripts_command_line_follows_its_mains_signature():
    from cnnstudy import cli

    def main(
        data: str,
        mode: typing.Literal["a", "b"] = "a",
        limit: int | None = None,
        flag: bool = True,
        files: list[str] = (),
        md5: dict | None = None,
    ) -> None: ...

    parser = cli.parser_for(main, {"data": "input"})
    args = vars(parser.parse_args(["--data", "x", "--limit", "none", "--flag", "false", "--files", "p", "q"]))
    assert args == {"data": "x", "mode": "a", "limit": None, "flag": False, "files": ["p", "q"]}  # md5: callers only
    assert vars(parser.parse_args(["--data", "x", "--limit", "3"]))["limit"] == 3
    for argv in (["--mode", "a"], ["--data", "x", "--mode", "c"], ["--data", "x", "--flag", "yes"], ["--dat", "x"]):
        with pytest.raises(SystemExit):  # data is required; choices; true|false; no abbreviations
            parser.parse_args(argv)
    with pytest.raises(TypeError, match="not parameters of"):
        cli.parser_for(main, {"dta": "typo"})


def test_the_makefiles_tool_commands_are_accepted_by_the_tools(tmp_path):
    """`make publish` and `make verify-published RECORD=1` call tools/publish.py and
    verify_published.py record with command lines their parsers accept: an option renamed in a
    tool fails here, not after the hours a full verification takes (it once did: `--refresh
    reports/study`)."""
    import shlex

    import publish
    import verify_published

    parsers = {
        "tools/publish.py": publish.parser(),
        "workflow_scripts/verify_published.py": verify_published.record_parser(),
    }
    called = []
    for target in (["publish"], ["verify-published", "RECORD=1"]):
        proc = subprocess.run(["make", "-n", *target, f"RESULTS={tmp_path}"], cwd=REPO, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        for line in proc.stdout.replace("\\\n", " ").splitlines():
            for command in re.split(r"&&|\|\||;", line):
                argv = shlex.split(command, comments=True)
                if len(argv) > 1 and argv[0] == "python" and argv[1] in parsers:
                    args = argv[3:] if argv[2:3] == ["record"] else argv[2:]
                    parsers[argv[1]].parse_args(args)  # exits (a test error) on an unknown option
                    called.append(argv[1])
    assert sorted(set(called)) == sorted(parsers) and called.count("tools/publish.py") == 2, called


GPU_REQUIREMENTS = ("requirements-gpu.txt", "requirements-jax-gpu.txt")


@early("gpu_resolutions")
def _gpu_resolutions(tmp_path_factory, started) -> dict:
    """pip's resolution of each GPU requirements file over this environment (`pip install --dry-run
    --report`: package metadata from the index, nothing installed). Mostly waiting on the index:
    begun with the session, at the lowest CPU priority, for this last file. File -> (process, its report's packages)."""
    root = tmp_path_factory.mktemp("gpu_resolutions")
    resolved = {}
    for name in GPU_REQUIREMENTS:
        report = root / f"{name}.json"
        proc = subprocess.run(
            ["nice", "-n", "19", sys.executable, "-m", "pip", "install", "--dry-run", "--quiet"]
            + ["--report", str(report), "-r", str(REPO / name)],
            capture_output=True,
            text=True,
            timeout=until_session_end(),
        )
        installs = json.loads(report.read_text())["install"] if report.is_file() else []
        resolved[name] = proc, {i["metadata"]["name"]: i["metadata"]["version"] for i in installs}
    return resolved


@pytest.fixture(scope="module")
def gpu_resolutions(started_early) -> dict:
    return started_early["gpu_resolutions"].result()


def test_the_gpu_installs_resolve_on_the_pinned_versions(gpu_resolutions):
    """`make run GPU=1` (TensorFlow's CUDA libraries) and `make run BACKEND=jax GPU=1` (jax[cuda12])
    resolve from the package index beside this environment's pins: CUDA wheels of the pinned JAX,
    nothing of requirements.txt upgraded or replaced."""
    pinned = pins((REPO / "requirements.txt").read_text().splitlines())
    for name, (proc, packages) in gpu_resolutions.items():
        assert proc.returncode == 0, f"{name}: pip cannot resolve it:\n{proc.stderr[-3000:]}"
        canonical = {re.sub(r"[-_.]+", "-", n).lower() for n in packages}
        assert not canonical & {re.sub(r"[-_.]+", "-", n).lower() for n in pinned}, f"{name} changes pins: {packages}"
        assert any(p.startswith("nvidia-cudnn-cu12") for p in packages), f"{name}: no cuDNN wheel in {packages}"
    jax_gpu = gpu_resolutions["requirements-jax-gpu.txt"][1]
    assert jax_gpu.get("jax-cuda12-plugin") == pinned["jax"] and jax_gpu.get("jax-cuda12-pjrt") == pinned["jax"], (
        jax_gpu
    )
