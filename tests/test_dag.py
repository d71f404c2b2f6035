"""dvc.yaml's deps follow the code: each stage depends on exactly the modules of src/mnist_gan its
script imports, directly or through other modules, at the top or inside a function (plus the
files a module reads beside itself, such as the C++ source it compiles). The closure is derived
from the code, so the next import someone adds cannot silently leave a cached stage up to date."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

from tests.helpers import REPO

PACKAGE = "mnist_gan"
SOURCE = Path("src") / PACKAGE


def _imported_modules(path: Path, root: Path) -> set[str]:
    """The modules of the package that the file at `path` imports anywhere in its body."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from mnist_gan import paths` names modules; `from mnist_gan.data import x`, one
            names = [f"{node.module}.{alias.name}" for alias in node.names] + [node.module]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == PACKAGE and len(parts) > 1 and (root / SOURCE / f"{parts[1]}.py").is_file():
                found.add(parts[1])
    return found


def _sibling_files(path: Path) -> set[str]:
    """Files other than modules that the module names as string constants (dropout.cpp)."""
    data = {file.name for file in path.parent.iterdir() if file.is_file() and file.suffix != ".py"}
    return {node.value for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.Constant) and node.value in data}


def library_closure(script: Path, root: Path) -> set[str]:
    """src/mnist_gan/... paths (as in dvc.yaml) that running `script` imports or reads."""
    seen: set[str] = set()
    todo = _imported_modules(root / script, root)
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        todo |= _imported_modules(root / SOURCE / f"{module}.py", root)
    paths = {str(SOURCE / f"{module}.py") for module in seen}
    for module in seen:
        paths |= {str(SOURCE / name) for name in _sibling_files(root / SOURCE / f"{module}.py")}
    return paths


def stale_deps(dvc_yaml: Path, root: Path) -> list[str]:
    """One line per stage dep of the library that is missing from dvc.yaml or listed needlessly."""
    problems = []
    for name, stage in yaml.safe_load(dvc_yaml.read_text())["stages"].items():
        scripts = [dep for dep in stage["deps"] if dep.startswith("stages/")]
        assert len(scripts) == 1 and scripts[0] in stage["cmd"], f"stage {name}: deps must list its script"
        listed = {dep for dep in stage["deps"] if dep.startswith(f"{SOURCE}/")}
        needed = library_closure(Path(scripts[0]), root)
        problems += [f"stage {name}: {scripts[0]} imports {dep}, missing from its deps"
                     for dep in sorted(needed - listed)]
        problems += [f"stage {name}: depends on {dep}, which {scripts[0]} does not import"
                     for dep in sorted(listed - needed)]
    return problems


def test_every_stage_depends_on_exactly_the_library_it_imports():
    assert stale_deps(REPO / "dvc.yaml", REPO) == []


def test_closure_follows_imports_through_modules_and_functions():
    closure = library_closure(Path("stages/train.py"), REPO)
    assert "src/mnist_gan/losses.py" in closure  # through training.py, not imported by the script
    assert "src/mnist_gan/plotting.py" in closure  # inside tracking.MlflowTracker.log_samples
    assert "src/mnist_gan/dropout.cpp" in closure  # compiled by cpu_dropout.py
    assert "src/mnist_gan/quality.py" not in closure


@pytest.mark.parametrize("stage, module", [("train_classifier", "data.py"), ("plot", "training.py"),
                                           ("train", "dropout.cpp")])
def test_a_dep_removed_from_dvc_yaml_is_named_with_its_stage(tmp_path, stage, module):
    pipeline = yaml.safe_load((REPO / "dvc.yaml").read_text())
    dep = f"src/mnist_gan/{module}"
    pipeline["stages"][stage]["deps"].remove(dep)
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump(pipeline))
    script = f"stages/{stage}.py"
    assert stale_deps(tmp_path / "dvc.yaml", REPO) == [f"stage {stage}: {script} imports {dep}, missing from "
                                                        "its deps"]


def test_a_dep_the_script_does_not_import_is_named(tmp_path):
    pipeline = yaml.safe_load((REPO / "dvc.yaml").read_text())
    pipeline["stages"]["download"]["deps"].append("src/mnist_gan/quality.py")
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump(pipeline))
    assert stale_deps(tmp_path / "dvc.yaml", REPO) == [
        "stage download: depends on src/mnist_gan/quality.py, which stages/download.py does not import"]
