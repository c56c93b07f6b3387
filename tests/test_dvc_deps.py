"""dvc.yaml's deps cover all the code each stage runs, so no edit can leave an output stale.

For every stage (foreach expanded), the project modules its command imports, transitively and
including imports inside functions, must each be a dep of that stage (the file itself or a
folder holding it). Otherwise `dvc repro` would call the stage up to date after that module
changed and keep outputs the new code would not make.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("diffusion", "pipeline", "stages")


def module_file(name: str, root: Path = REPO) -> Path | None:
    """The file of a dotted project module (a package's __init__.py), None if there is none."""
    path = root.joinpath(*name.split("."))
    if (path / "__init__.py").is_file():
        return path / "__init__.py"
    return path.with_suffix(".py") if path.with_suffix(".py").is_file() else None


def imported_files(file: Path, root: Path = REPO) -> set[Path]:
    """Project files ``file`` imports anywhere in it; importing a.b.c runs a, a.b and a.b.c."""
    found: set[Path] = set()
    for node in ast.walk(ast.parse(file.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] not in PACKAGES:
                continue
            for end in range(1, len(parts) + 1):
                if (path := module_file(".".join(parts[:end]), root)) is not None:
                    found.add(path)
    return found


def import_closure(module: str, root: Path = REPO) -> set[str]:
    """Every project file that running ``python -m <module>`` may import, relative to root."""
    parts = module.split(".")  # running a.b imports the package a first
    todo = [module_file(".".join(parts[:end]), root) for end in range(1, len(parts) + 1)]
    seen: set[Path] = set()
    while todo:
        file = todo.pop()
        if file not in seen:
            seen.add(file)
            todo.extend(imported_files(file, root))
    return {str(path.relative_to(root)) for path in seen}


def stages_with_deps(dvc: dict) -> dict[str, tuple[str, list[str]]]:
    """stage name -> (module its cmd runs, its deps), foreach stages expanded."""
    out = {}
    models = yaml.safe_load((REPO / "params.yaml").read_text())["models"]
    for name, spec in dvc["stages"].items():
        items = models if spec.get("foreach") == "${models}" else spec.get("foreach")
        body = spec["do"] if items is not None else spec
        for item in items if items is not None else [None]:
            fill = (lambda text: text.replace("${item}", str(item))) if item else (lambda text: text)
            module = re.search(r"-m (stages\.\w+)", body["cmd"]).group(1)
            out[f"{name}@{item}" if item else name] = (module, [fill(d) for d in body["deps"]])
    return out


def uncovered(dvc: dict, root: Path = REPO) -> dict[str, list[str]]:
    """For each stage, the files it imports that none of its deps covers."""
    missing = {}
    for stage, (module, deps) in stages_with_deps(dvc).items():
        lacking = [file for file in sorted(import_closure(module, root))
                   if not any(file == dep or file.startswith(dep.rstrip("/") + "/") for dep in deps)]
        if lacking:
            missing[stage] = lacking
    return missing


DVC = yaml.safe_load((REPO / "dvc.yaml").read_text())


def test_every_stage_depends_on_all_the_code_it_imports():
    assert uncovered(DVC) == {}


def test_stages_declare_no_code_they_do_not_run():
    """A dep on code the stage never imports re-runs it for nothing."""
    for stage, (module, deps) in stages_with_deps(DVC).items():
        code = [dep for dep in deps if dep.endswith(".py")]
        assert sorted(set(code) - import_closure(module)) == [], stage


@pytest.mark.parametrize("dropped", ["pipeline/common.py", "diffusion/process.py", "pipeline/params.py"])
def test_a_removed_dep_is_reported(dropped):
    broken = yaml.safe_load((REPO / "dvc.yaml").read_text())
    broken["stages"]["evaluate"]["do"]["deps"].remove(dropped)
    assert uncovered(broken) == {"evaluate@ddpm": [dropped], "evaluate@ddgm": [dropped]}


def test_closure_follows_imports_inside_functions(tmp_path):
    (tmp_path / "stages").mkdir()
    (tmp_path / "diffusion").mkdir()
    (tmp_path / "stages/__init__.py").write_text("")
    (tmp_path / "diffusion/__init__.py").write_text("")
    (tmp_path / "diffusion/late.py").write_text("")
    (tmp_path / "stages/one.py").write_text("def main():\n    from diffusion import late\n")
    assert import_closure("stages.one", tmp_path) == {
        "stages/__init__.py", "stages/one.py", "diffusion/__init__.py", "diffusion/late.py"}
