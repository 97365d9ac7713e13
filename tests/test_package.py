"""mocae as an installed package: lazy top-level exports, presets as package data, a wheel that works
outside the checkout."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

import mocae
from mocae.config import presets_dir, resolve_preset

ROOT = Path(__file__).resolve().parents[1]


def _clean_env() -> dict:
    # No PYTHONPATH: it would put a checkout's src ahead of what is installed.
    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


def test_top_level_exports_load_on_first_use():
    code = ("import sys, mocae\n"
            "assert 'torch' not in sys.modules, 'import mocae pulled torch'\n"
            "from mocae import MoCaEModel, MoCaEConfig, fit_router, train_expert, evaluate, load_system, AXES\n"
            "import mocae.mixture.model as m, mocae.systems as s\n"
            "assert MoCaEModel is m.MoCaEModel and load_system is s.load_system and AXES[0] == 'helpful'\n")
    env = {**os.environ, "PYTHONPATH": str(Path(mocae.__file__).parents[1])}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        mocae.nope  # noqa: B018


def test_presets_are_package_data_and_a_path_still_works(tmp_path):
    assert presets_dir().parent == Path(mocae.__file__).parent
    assert resolve_preset("quick") == presets_dir() / "quick.yaml"
    own = tmp_path / "mine.yaml"
    shutil.copyfile(resolve_preset("quick"), own)
    assert resolve_preset(own) == own


@pytest.mark.slow
def test_wheel_installs_and_runs_outside_the_checkout(tmp_path):
    """Build a wheel from a copy of the project, install it into a fresh venv, use it from elsewhere."""
    project = tmp_path / "project"  # a copy: building in the checkout would leave build/ and egg-info there
    shutil.copytree(ROOT / "src", project / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copyfile(ROOT / name, project / name)
    env = _clean_env()
    run = dict(check=True, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=180)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp_path / "dist"), str(project)], **run)
    wheel = next((tmp_path / "dist").glob("mocae-*.whl"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", "--system-site-packages", str(venv)], **run)
    python = venv / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               **run).stdout.strip())
    # The dependencies (torch, transformers, ...) come from this interpreter's site-packages; a plain
    # path line does not read that folder's .pth files, so an editable mocae there stays invisible.
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps",
                    "--no-index", str(wheel)], **run)

    code = ("import mocae, pathlib, sys; from mocae.pipeline import load_run_config\n"
            "cfg = load_run_config('quick')\n"
            "print(mocae.__file__); print(cfg.name)\n")
    where, name = subprocess.run([str(python), "-c", code], **run).stdout.split()
    assert Path(where).is_relative_to(venv) and name == "quick"
    help_text = subprocess.run([str(venv / "bin" / "mocae"), "run", "--help"], **run).stdout
    assert "--preset" in help_text
