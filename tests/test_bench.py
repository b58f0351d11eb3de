"""The layer benchmark on tiny lengths: records, out-of-memory guard, table, entries."""

import json

from lra import bench


def test_entries_carry_options():
    assert bench.parse_entry("linear:form=recurrent:chunk_size=16") == (
        "linear", {"form": "recurrent", "chunk_size": 16})
    assert bench.parse_entry("local:overlap=true") == ("local", {"overlap": True})


def test_bench_writes_records_and_a_table(tmp_path, capsys):
    bench.main(["--attention", "softmax,linear:form=recurrent", "--lengths", "16,32",
                "--heads", "2", "--head_dim", "4", "--repeats", "2", "--out", str(tmp_path)])
    records = json.loads((tmp_path / "bench.json").read_text())
    assert [(r["attention"], r["length"]) for r in records] == [
        ("softmax", 16), ("linear:form=recurrent", 16), ("softmax", 32),
        ("linear:form=recurrent", 32)]
    for record in records:
        assert record["time_ms"] > 0 and record["peak_bytes"] > 0 and not record["oom"]
    assert "| linear:form=recurrent |" in capsys.readouterr().out


def test_over_budget_is_recorded_as_oom_without_running():
    record = bench.measure("softmax", length=64, batch=1, heads=2, head_dim=4,
                           dtype="float32", causal=False, repeats=1, memory_budget_bytes=1.0)
    assert record["oom"] and record["time_ms"] is None and record["peak_bytes"] > 1
    assert "OOM" in bench.markdown([record])
