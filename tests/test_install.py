"""The package installed (not editable) into a fresh venv works from any folder: the
shipped configs, `lra-train` with a sweep (whose run is `python -m lra.launch`), the
report and the benchmark. No network: dependencies are the test interpreter's own."""

import os
import shutil
import site
import subprocess
import sys
from pathlib import Path


from tests.test_train import TINY

ROOT = Path(__file__).resolve().parents[1]
# What a wheel is built from: the project file, its readme, the two packages.
SOURCES = ("pyproject.toml", "README.md", "lra", "configs")
TINY_MODEL = {"model.emb_dim": 16, "model.qkv_dim": 16, "model.mlp_dim": 16,
              "num_train_steps": 4, "eval_every": 4, "checkpoint_every": 4}
BENCH_SMALLEST = ["--scopes", "step", "--attention", "softmax", "--no_baseline", "--lengths", "16",
                  "--repeats", "1", "--step_layers", "1", "--step_emb_dim", "16",
                  "--step_qkv_dim", "16", "--step_heads", "2", "--step_mlp_dim", "16",
                  "--matmul_size", "64"]


def _install(tmp_path: Path) -> Path:
    """A venv holding lra installed from a copy of the checkout; returns its bin folder.

    The venv reaches the test interpreter's dependencies through a .pth file (which does
    not process that environment's own .pth files, so an editable lra there stays out).
    """
    source = tmp_path / "source"
    source.mkdir()
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, source / name,
                            ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(ROOT / name, source / name)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", "--system-site-packages",
                    str(venv)], check=True)
    packages = Path(subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        check=True, capture_output=True, text=True).stdout.strip())
    (packages / "_lra_test_dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--no-deps",
                    "--no-build-isolation", "--no-index", str(source)],
                   check=True, cwd=tmp_path, capture_output=True)
    return venv / "bin"


def _run(command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done


def test_installed_package_trains_sweeps_reports_and_benchmarks(tmp_path):
    bin_dir = _install(tmp_path)
    python = str(bin_dir / "python")
    elsewhere = tmp_path / "elsewhere"  # no checkout here: only the installed package
    elsewhere.mkdir()
    where = _run([python, "-c", "import configs, lra; print(lra.__file__); print(configs.__file__)"],
                 elsewhere).stdout.split()
    assert all(str(tmp_path / "venv") in path and "site-packages" in path for path in where), where

    flags = [f"--config.{key}={value}" for key, value in
             {**TINY, **TINY_MODEL, "data_dir": elsewhere / "data"}.items()]
    swept = _run([str(bin_dir / "lra-train"), "--config", "configs/listops.py:runlocal",
                  "--workdir", "sweep", "--sweep", "seed=0", *flags], elsewhere)
    assert "-m lra.launch --config" in swept.stdout and "1 finished" in swept.stdout
    assert (elsewhere / "sweep" / "seed=0" / "results.json").is_file()

    _run([python, "-m", "lra.report", "sweep"], elsewhere)
    assert "ListOps" in (elsewhere / "sweep" / "report" / "report.md").read_text()
    _run([python, "-m", "lra.bench", *BENCH_SMALLEST, "--out", "bench"], elsewhere)
    assert (elsewhere / "bench" / "bench.json").is_file()
