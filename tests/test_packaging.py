"""The installed plugin: what the wheel holds, and that its bundled bases and plans resolve without the
repository (as on the GPU machine, where the plugin is installed with pip)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_wheel_ships_kernels_patches_and_bases_under_the_plugin(tmp_path):
    src = tmp_path / "src"  # a copy: setuptools builds inside the source tree
    for name in ("vllm_lowrank", "patches", "triton_kernels", "bases"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "--disable-pip-version-check", str(src), "-w", str(tmp_path / "whl")],
                   check=True, cwd=tmp_path)
    (wheel,) = (tmp_path / "whl").glob("vllm_lowrank-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for f in sorted((REPO / "bases").iterdir()):
        assert f"vllm_lowrank/bases/{f.name}" in names
    assert "vllm_lowrank/kernels/decode.py" in names and "vllm_lowrank/patches/__init__.py" in names
    # a top-level triton_kernels would shadow the PyPI package that vLLM probes for its MoE kernels
    assert not any(n.startswith(("triton_kernels/", "patches/", "bases/")) for n in names)

    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--disable-pip-version-check",
                    "--target", str(tmp_path / "site"), str(wheel)], check=True)
    probe = ("from pathlib import Path; from vllm_lowrank.config import expand_plan; "
             "from vllm_lowrank.evaluate import DEFAULT_PLANS, DEFAULT_BASIS; "
             "assert DEFAULT_PLANS.is_file() and DEFAULT_BASIS.is_file(), DEFAULT_PLANS; "
             "s = expand_plan(f'{DEFAULT_PLANS}:4x'); assert Path(s['basis']).is_file(); print(DEFAULT_PLANS)")
    out = subprocess.run([sys.executable, "-P", "-c", probe], cwd=tmp_path, capture_output=True, text=True,
                         env={"PYTHONPATH": str(tmp_path / "site"), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().startswith(str(tmp_path / "site" / "vllm_lowrank" / "bases"))


def test_installed_plugin_exposes_no_top_level_repository_folders(tmp_path):
    """The test environment's own install of the plugin (editable in CI) maps triton_kernels/ and patches/
    only under vllm_lowrank: a top-level `triton_kernels` from this repository would shadow the PyPI
    package that vLLM probes for its MoE kernels."""
    probe = ("import importlib.util as u, json; "
             "print(json.dumps({n: getattr(u.find_spec(n), 'origin', None) for n in ('triton_kernels', 'patches', 'bases')}))")
    out = subprocess.run([sys.executable, "-P", "-c", probe], cwd=tmp_path, capture_output=True, text=True, check=True)
    for name, origin in json.loads(out.stdout).items():
        assert origin is None or not origin.startswith(str(REPO)), f"top-level {name} comes from the repository: {origin}"
    import vllm_lowrank.kernels

    assert Path(vllm_lowrank.kernels.__file__).resolve().parent == REPO / "triton_kernels"
