"""lra.bench's longest scope: the longest step that fits a per-device budget, per seq."""

import json

import jax
import pytest

from lra.bench import layers as bench
from lra.bench import longest

TINY = ["--step_layers", "1", "--step_emb_dim", "16", "--step_qkv_dim", "16",
        "--step_heads", "2", "--step_mlp_dim", "16", "--step_dropout", "0", "--repeats", "1"]
# Compiled peaks per device of this tiny step (gated_deltanet, 4 devices): about 1.6 MiB at
# 128 and 5 MiB at 512 with seq = 1 (4 sequences), 0.3 and 1.7 MiB with seq = 4 (1 sequence
# split 4 ways): 3 MiB fits 512 only under sequence parallelism.
BUDGET_GB = 3 / 1024


@pytest.mark.skipif(jax.device_count() < 4, reason="needs 4 devices")
def test_longest_length_grows_with_the_seq_axis(tmp_path):
    records = bench.main(["--scopes", "longest", "--attention", "gated_deltanet",
                          "--longest_seqs", "1,4", "--lengths", "128,512",
                          "--memory_budget_gb", str(BUDGET_GB), *TINY, "--out", str(tmp_path)])
    one, four = records
    assert [(r["scope"], r["attention"], r["seq"], r["devices"], r["rows"])
            for r in records] == [("longest", "gated_deltanet", 1, 4, 4),
                                  ("longest", "gated_deltanet", 4, 4, 1)]
    assert (one["longest_length"], four["longest_length"]) == (128, 512)
    assert one["next_length"] == 512 and one["next_peak_bytes"] > BUDGET_GB * 2**30
    assert four["next_length"] is None  # every length fitted
    for r in records:
        assert r["error"] is None and not r["oom"] and r["time_ms"] > 0
        assert r["tokens_per_s"] == pytest.approx(r["rows"] * r["longest_length"] * 1e3
                                                  / r["time_ms"])
        assert 0 < r["compiled_peak_bytes"] <= BUDGET_GB * 2**30
        assert r["device"] and r["tried"][0]["length"] == 128
    assert json.loads((tmp_path / "bench.json").read_text()) == records
    text = (tmp_path / "bench.md").read_text()
    assert "### Longest trainable length" in text and "| attention | seq = 1 | seq = 4 |" in text
    assert "| gated_deltanet | 128 / " in text
    assert not list(tmp_path.glob("*.png"))


def test_a_mixer_without_sequence_parallelism_is_an_error_record():
    """validate_config refuses it before anything is compiled; the run goes on."""
    settings = bench.Settings(step_layers=1, step_emb_dim=16, step_qkv_dim=16, step_heads=2,
                              step_mlp_dim=16)
    record = longest.measure("local", 4, 4, [128], settings, {"device": "d"}, bench)
    assert record["longest_length"] is None and record["time_ms"] is None
    assert "local" in record["error"] and record["tried"] == []
    assert longest.default_seqs(4) == [1, 2, 4] and longest.default_seqs(6) == [1, 2]
