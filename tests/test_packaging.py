"""The built wheel and sdist hold what a user installs: every subpackage, py.typed, the LICENSE; no tests."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _can_build_wheels() -> bool:
    import setuptools

    major, minor = (int(x) for x in setuptools.__version__.split(".")[:2])
    return (major, minor) >= (70, 1) or importlib.util.find_spec("wheel") is not None  # bdist_wheel's home


def _subpackages() -> set[str]:
    return {str(p.parent.relative_to(ROOT)).replace("\\", "/") for p in (ROOT / "star_heads").rglob("__init__.py")}


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, set[str]]:
    if not _can_build_wheels():
        pytest.skip("this setuptools cannot build wheels without the 'wheel' package")
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "star_heads", src / "star_heads", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "tests", src / "tests", ignore=shutil.ignore_patterns("__pycache__"))  # must stay out
    out = tmp_path_factory.mktemp("dist")
    for hook in ("build_wheel", "build_sdist"):  # one process per hook, as pip and build call them
        code = f"import sys; from setuptools import build_meta; build_meta.{hook}(sys.argv[1])"
        subprocess.run([sys.executable, "-c", code, str(out)], cwd=src, check=True, capture_output=True, text=True)
    (wheel,) = out.glob("*.whl")
    (sdist,) = out.glob("*.tar.gz")
    with zipfile.ZipFile(wheel) as z:
        wheel_names = set(z.namelist())
    with tarfile.open(sdist) as t:
        sdist_names = {n.split("/", 1)[1] for n in t.getnames() if "/" in n}
    return {"wheel": wheel_names, "sdist": sdist_names}


def test_wheel_holds_every_subpackage_py_typed_and_the_license(built):
    names = built["wheel"]
    for package in _subpackages():
        assert f"{package}/__init__.py" in names, package
    assert "star_heads/py.typed" in names
    assert any(n.endswith(".dist-info/LICENSE") or "/licenses/LICENSE" in n for n in names), sorted(names)
    assert not any(n.startswith(("tests/", "examples/", "benchmarks/")) for n in names)
    metadata = next(n for n in names if n.endswith(".dist-info/METADATA"))
    assert metadata


def test_sdist_holds_the_license_and_py_typed(built):
    names = built["sdist"]
    assert "LICENSE" in names and "star_heads/py.typed" in names and "pyproject.toml" in names


def test_required_dependencies_are_imported_by_the_package():
    """No required dependency that star_heads never imports (scipy is a test-only oracle)."""
    import re

    try:
        import tomllib
    except ImportError:  # Python 3.10
        pytest.importorskip("tomli")
        import tomli as tomllib
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    source = "\n".join(p.read_text() for p in (ROOT / "star_heads").rglob("*.py"))
    for dep in deps:
        name = re.split(r"[<>=!~ \[]", dep, maxsplit=1)[0]
        assert re.search(rf"^\s*(import|from) {name}\b", source, flags=re.M), f"{name} is required but never imported"
