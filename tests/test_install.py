"""The built package: every code package and the configs (conf/, as snnbench/conf/) go into it, so that a
non-editable install runs `snnbench run` from any folder."""

import subprocess
import sys

import pytest

from snnbench.app.cli import CONF_DIR

ROOT = CONF_DIR.parent


def test_every_package_is_in_the_built_package():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    listed = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    found = [".".join(path.parent.relative_to(ROOT).parts) for path in (ROOT / "snnbench").rglob("__init__.py")]
    assert sorted(listed) == sorted([*found, "snnbench.conf"])


@pytest.mark.slow
def test_install_of_a_clean_clone_runs_from_any_folder(tmp_path):
    """`pip install .` (not editable) of a fresh clone of the committed tree into a new virtual environment, then
    `snnbench run` from a folder that has no conf/ (make install-check)."""
    source, venv, elsewhere = tmp_path / "source", tmp_path / "venv", tmp_path / "elsewhere"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(source)], check=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([venv / "bin" / "pip", "install", "-q", str(source)], check=True, capture_output=True)
    elsewhere.mkdir()
    done = subprocess.run([venv / "bin" / "snnbench", "run", "sim.T=4", "train.epochs=1", "sim.num_samples=40"],
                          cwd=elsewhere, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    (run,) = (elsewhere / "outputs" / "runs").glob("*/*_digits_baseline")
    assert done.stderr.endswith(f"results in {run}\n")
    assert {".hydra", "accuracy.csv", "layers.csv", "summary.json"} <= {p.name for p in run.iterdir()}
    conf = subprocess.run([venv / "bin" / "python", "-c", "from snnbench.app.cli import CONF_DIR; print(CONF_DIR)"],
                          cwd=elsewhere, capture_output=True, text=True, check=True).stdout.strip()
    assert conf.startswith(str(venv)) and conf.endswith("site-packages/snnbench/conf")
