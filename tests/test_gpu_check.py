"""scripts/gpu_check.sh without a GPU: what it would run (--dry_run) and the message it
gives on a machine without one. The run itself needs a GPU (`make gpu-check`)."""

import os
import shlex
import subprocess
import sys
from pathlib import Path

from lra.bench import layers as bench
from lra.models import mixers

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
REQUIRED = ("softmax:implementation=xla", "softmax:implementation=cudnn",
            "softmax:implementation=pallas", "memory_efficient", "linear", "performer", "local",
            "nystromformer", "retnet", "gla", "mamba2", "deltanet",
            "gated_deltanet:chunk_strategy=scan", "gated_deltanet:chunk_strategy=batched",
            "s5", "lru")


def _flag(words: list[str], name: str) -> str:
    return words[words.index(name) + 1]


def test_dry_run_covers_the_tests_every_entry_both_scopes_and_dtypes_and_listops():
    done = subprocess.run([str(SCRIPT), "--dry_run"], capture_output=True, text=True, timeout=30,
                          check=True)
    commands = [shlex.split(line) for line in done.stdout.splitlines()]
    # The parts' time limits leave 20 s of the 8 minutes for the device check and merging.
    assert sum(int(words[1]) for words in commands) <= 8 * 60 - 20
    tests = next(words for words in commands if "pytest" in words)
    assert "LRA_TEST_PLATFORM=cuda" in tests and "tests/test_attention.py" in tests
    assert "tests/test_pallas_attention.py" in tests
    benches = [words for words in commands if "lra.bench" in words]
    measured = {(_flag(w, "--dtype"), _flag(w, "--scopes")) for w in benches}
    assert measured == {(d, s) for d in ("bfloat16", "float32") for s in ("layer", "step")}
    for words in benches:
        assert _flag(words, "--lengths") == "1024,4096,16384"
        entries = _flag(words, "--attention").split(",")
        expected = [e for e in REQUIRED if "cudnn" not in e or _flag(words, "--dtype") == "bfloat16"]
        assert sorted(entries) == sorted(expected)
        assert all(bench.parse_entry(entry)[0] in mixers.NAMES for entry in entries)
    listops = next(words for words in commands if "lra.launch" in words)
    assert "configs/listops.py:preset=lra" in listops
    assert "--config.num_train_steps=300" in listops


def test_without_a_gpu_it_stops_at_once_saying_so():
    env = {**os.environ, "PYTHON": sys.executable, "OUT": "/nonexistent/never-written"}
    env.pop("JAX_PLATFORMS", None)
    done = subprocess.run([str(SCRIPT)], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 3, done.stdout + done.stderr
    assert done.stderr.startswith("error: no GPU.") and "JAX sees" in done.stderr
    assert "Traceback" not in done.stderr
