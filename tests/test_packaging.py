"""The package as a user installs it: a wheel (not an editable install) in a fresh virtual
environment, used from a folder outside the source tree; and the shipped files speak only of
the package itself."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ["ssl_lib", "setup.cfg", "pyproject.toml", "README.md"]


def _run(*cmd, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def build_wheel(tmp_path: Path) -> Path:
    """Build the wheel from a copy of the sources (the checkout stays clean), offline."""
    src = tmp_path / "src"
    src.mkdir()
    for name in SOURCES:
        item = ROOT / name
        if item.is_dir():
            shutil.copytree(item, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(item, src / name)
    dist = tmp_path / "dist"
    pip = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation"]
    _run(*pip, "--no-index", "-w", dist, src, cwd=tmp_path)
    (wheel,) = dist.glob("ssl_lib-*.whl")
    return wheel


def fresh_venv(tmp_path: Path) -> tuple[Path, dict]:
    """A new virtual environment that sees this environment's packages (torch, lightning...)
    through a ``.pth`` file, but not its ``ssl_lib``: the ``.pth`` adds the folder to the path
    without running the editable-install hooks in it, and the venv's own site-packages comes
    first. Returns its bin folder and an environment without ``PYTHONPATH``."""
    venv = tmp_path / "venv"
    _run(sys.executable, "-m", "venv", "--without-pip", venv, cwd=tmp_path)
    (site,) = (venv / "lib").glob("python3*/site-packages")
    parents = dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib"))
    (site / "parent_env.pth").write_text("\n".join(parents) + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return venv / "bin", env


@pytest.mark.slow  # 28-46 s on 2 busy cores: six subprocesses, three of them import torch
def test_wheel_installs_and_runs_from_any_folder(tmp_path):
    wheel = build_wheel(tmp_path)
    names = zipfile.ZipFile(wheel).namelist()
    assert "ssl_lib/__main__.py" in names
    assert "ssl_lib/recipes/demo/msf.yaml" in names
    assert "ssl_lib/recipes/imagenet/_umbc.yaml" in names  # bases ship too
    assert "ssl_lib/recipes/eval/_cifar10.yaml" in names
    assert "ssl_lib/data/class_lists/imagenet100.txt" in names  # package data beyond recipes

    bin_dir, env = fresh_venv(tmp_path)
    python = bin_dir / "python"
    install = [python, "-m", "pip", "install", "--no-deps", "--no-index", "--ignore-installed"]
    _run(*install, wheel, cwd=tmp_path, env=env)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    # one interpreter start for what needs no command: where ssl_lib comes from, and a user's
    # recipe file that extends a shipped recipe by name
    (elsewhere / "mine.yaml").write_text("base: demo/msf\nmethod: {k: 3}\n")
    probe = (
        "import ssl_lib; from ssl_lib.config import load_config; cfg = load_config('mine.yaml'); "
        "print(ssl_lib.__file__); print(cfg.run.name, cfg.method.k, cfg.model.backbone)"
    )
    where, loaded = _run(python, "-c", probe, cwd=elsewhere, env=env).stdout.splitlines()
    installed = Path(where).resolve()
    assert installed.is_relative_to(tmp_path / "venv") and not installed.is_relative_to(ROOT)
    assert loaded == "demo_msf 3 tiny_cnn"

    recipes = _run(python, "-m", "ssl_lib", "recipes", cwd=elsewhere, env=env).stdout.split()
    assert {"demo/msf", "imagenet/msf", "cifar10/msf", "eval/knn_umbc"} <= set(recipes)

    quick = [
        "trainer.max_steps=1",
        "data.synthetic.num_samples=64",
        "data.num_workers=0",
        "trainer.progress_bar=false",
        "monitor.knn_every_n_epochs=0",
    ]
    out = _run(bin_dir / "ssl-lib", "train", "demo/msf", *quick, cwd=elsewhere, env=env).stdout
    assert "run folder:   runs/demo_msf\n" in out
    assert (elsewhere / "runs" / "demo_msf" / "checkpoints" / "last.ckpt").is_file()


def test_one_copy_of_the_recipes():
    assert not (ROOT / "recipes").exists()
    assert any((ROOT / "ssl_lib" / "recipes" / "demo").glob("*.yaml"))


# ------------------------------------------------------------------ self-contained files
SPEC_FILES = re.compile(r"METHODS\.md|BEYOND\.md|PEERS\.md|DESIGN\.md")
OUTSIDE = re.compile(r"\.\./shared")
TEXT = {".py", ".yaml", ".yml", ".md", ".cfg", ".toml", ".txt", ".sh"}


def _files(*tops: str) -> list[Path]:
    found = []
    for top in tops:
        path = ROOT / top
        items = [path] if path.is_file() else sorted(path.rglob("*"))
        found += [p for p in items if p.is_file() and p.suffix in TEXT]
    return found


def test_shipped_files_cite_no_file_outside_the_repository():
    """Recipes, code, docs, README and packaging name no team spec file and no ``../shared``
    folder; benchmarks may read ``../shared`` data but cite no spec file either."""
    shipped = _files("ssl_lib", "docs", "README.md", "setup.cfg", "pyproject.toml")
    assert any(p.suffix == ".yaml" for p in shipped) and any(p.suffix == ".md" for p in shipped)
    hits = []
    for path in shipped:
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if SPEC_FILES.search(line) or OUTSIDE.search(line):
                hits.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    for path in _files("benchmarks"):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if SPEC_FILES.search(line):
                hits.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not hits, "\n".join(hits)
