"""The layout contract (DESIGN 2): imports flow one way, no package import hides inside a function, and each
on-disk file name is spelled once, in artifacts/layout.py."""
import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from eigen_export.artifacts import layout

PACKAGE = Path(__file__).resolve().parents[1] / "eigen_export"
PYPROJECT = PACKAGE.parent / "pyproject.toml"
# imported inside the function that needs them, so that --help and the CPU path never load them
HEAVY_OPTIONAL = {"onnx", "onnxruntime", "onnxruntime_extensions", "onnxscript", "onnx_ir", "tensorrt", "triton",
                  "matplotlib", "polygraphy", "onnx_graphsurgeon"}


def _lint_imports(cwd: Path) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("lint-imports")
    if not exe.exists():
        pytest.fail("lint-imports is missing: install the dev extra (pip install -e '.[dev]')")
    return subprocess.run([str(exe), "--config", str(cwd / "pyproject.toml")], cwd=cwd, capture_output=True,
                          text=True, env={"PYTHONPATH": str(cwd), "PATH": ""})


def test_imports_flow_one_way():
    result = _lint_imports(PACKAGE.parent)
    assert result.returncode == 0, result.stdout[-3000:]
    assert "1 kept, 0 broken" in result.stdout


def test_the_contract_catches_an_import_against_the_flow(tmp_path):
    """The same check on a copy where the method imports a stage: lint-imports must break it."""
    shutil.copytree(PACKAGE, tmp_path / "eigen_export", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(PYPROJECT, tmp_path / "pyproject.toml")
    target = tmp_path / "eigen_export" / "method" / "decompose.py"
    target.write_text(target.read_text() + "\nfrom ..stages import build  # noqa\n")
    result = _lint_imports(tmp_path)
    assert result.returncode != 0 and "BROKEN" in result.stdout
    assert "eigen_export.method.decompose -> eigen_export.stages" in result.stdout


def _modules():
    return sorted(PACKAGE.rglob("*.py"))


def test_no_package_import_inside_a_function():
    inner = []
    for path in _modules():
        tree = ast.parse(path.read_text())
        top = {id(node) for node in tree.body}
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in top:
                names = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
                own = (isinstance(node, ast.ImportFrom) and node.level > 0) or \
                    any(n.split(".")[0] in ("eigen_export", "eigen_export_plugins") for n in names)
                if own:
                    inner.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}")
    assert not inner, f"package imports inside functions: {inner}"


def test_heavy_optional_packages_load_only_where_needed():
    """Module-level imports never name an optional heavy package (they are imported by the function using them)."""
    found = []
    for path in _modules():
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
                found += [f"{path.name}: {n}" for n in names if n.split(".")[0] in HEAVY_OPTIONAL]
    assert not found, found


def test_each_record_file_name_is_spelled_once():
    names = {value for key, value in vars(layout).items() if key.isupper() and isinstance(value, str)
             and "." in value}
    assert {"eigen.json", "calib.json", "io.json", "build.json", "report.json", "model.onnx"} <= names
    spelled = []
    for path in _modules():
        if path.name == "layout.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in names:
                spelled.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.value!r}")
    assert not spelled, f"file names spelled outside artifacts/layout.py: {spelled}"
