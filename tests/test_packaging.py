"""Installing steerloop adds exactly one importable name, ``steerloop``: built as a wheel
and installed into an empty target directory, and as the editable install the tests run on."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("driving_log", "sim", "agents", "training", "evaluation")

IMPORT_CHECK = """
import importlib, sys
importlib.import_module("steerloop.sim")
importlib.import_module("steerloop.evaluation.cli")
import steerloop
from steerloop.evaluation.study import PRESETS_DIR
assert (PRESETS_DIR / "demo.toml").is_file(), PRESETS_DIR
leaked = []
for name in {layers!r}:
    try:
        importlib.import_module(name)
        leaked.append(name)
    except ModuleNotFoundError:
        pass
print("leaked:", leaked, "from", steerloop.__file__)
"""


def _check_imports(tmp_path: Path, env: dict[str, str]) -> str:
    result = subprocess.run([sys.executable, "-c", IMPORT_CHECK.format(layers=LAYERS)], capture_output=True,
                            text=True, cwd=tmp_path, env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built from a copy of the tracked files (setuptools writes build/ beside the sources)."""
    source, out = tmp_path_factory.mktemp("source"), tmp_path_factory.mktemp("wheel")
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    for name in filter(None, tracked.decode().split("\0")):
        if (ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out),
                    str(source)], check=True, capture_output=True, timeout=300)
    (path,) = out.glob("steerloop-*.whl")
    return path


def test_wheel_holds_only_the_steerloop_package(wheel):
    with zipfile.ZipFile(wheel) as archive:
        top = {name.split("/")[0] for name in archive.namelist()}
        names = set(archive.namelist())
    assert {t for t in top if not t.endswith(".dist-info")} == {"steerloop"}
    assert {"steerloop/sim/env.py", "steerloop/sim/tracks/s-bend.json", "steerloop/studies/demo.toml",
            "steerloop/evaluation/cli.py"} <= names


def test_wheel_installed_alone_imports_steerloop_and_no_generic_names(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    assert sorted(p.name for p in target.iterdir() if not p.name.endswith(".dist-info")) in (["steerloop"],
                                                                                             ["bin", "steerloop"])
    # -I-like isolation from the source tree: only the target and the dependencies' site-packages.
    deps = [p for p in sys.path if p.endswith("site-packages")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(target), *deps]), "PYTHONNOUSERSITE": "1"}
    line = _check_imports(tmp_path, {**env, "PYTHONSAFEPATH": "1"})
    assert line.startswith("leaked: []"), line
    assert str(target) in line  # the installed copy, not the checkout (editable finder comes later on the path)


def test_editable_install_exposes_no_generic_names(tmp_path):
    line = _check_imports(tmp_path, {**os.environ, "PYTHONSAFEPATH": "1"})
    assert line.startswith("leaked: []"), line
