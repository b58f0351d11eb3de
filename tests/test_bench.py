"""lra.bench on tiny lengths: records, baselines, FLOP counts, out-of-memory paths, files."""

import json

import jax
import jax.numpy as jnp
import pytest

from lra.bench import layers as bench, output

TINY = ["--heads", "2", "--head_dim", "8", "--step_layers", "1", "--step_emb_dim", "16",
        "--step_qkv_dim", "16", "--step_heads", "2", "--step_mlp_dim", "32", "--repeats", "2",
        "--matmul_size", "128"]

REQUIRED = {"attention": str, "scope": str, "length": int, "batch": int, "heads": int,
            "head_dim": int, "dtype": str, "time_ms": float, "tokens_per_s": float,
            "speedup_vs_softmax": float, "peak_bytes": int, "flops": float, "oom": bool,
            "device": str, "dot_flops": int, "matmul_fraction": float,
            "speedup_vs_exact": float, "exact_baseline": str, "memory_source": str}


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """Both scopes, the step at one length only (compiling a train step is the slow part)."""
    out = tmp_path_factory.mktemp("bench")
    layer = bench.main(["--attention", "linear", "--lengths", "64,128", "--scopes", "layer",
                        "--baselines", "softmax", *TINY, "--out", str(out / "layer")])
    step = bench.main(["--attention", "linear", "--lengths", "64", "--scopes", "step",
                       "--baselines", "softmax", *TINY, "--out", str(out / "step")])
    return out, layer + step


def _find(records, scope, name, length):
    (record,) = [r for r in records if (r["scope"], r["attention"], r["length"])
                 == (scope, name, length)]
    return record


def test_entries_carry_options():
    assert bench.parse_entry("linear:form=recurrent:chunk_size=16") == (
        "linear", {"form": "recurrent", "chunk_size": 16})
    assert bench.parse_entry("local:overlap=true") == ("local", {"overlap": True})


def test_records_have_every_key_with_its_type(full_run):
    out, records = full_run
    written = [json.loads((out / scope / "bench.json").read_text()) for scope in ("layer", "step")]
    assert written[0] + written[1] == records
    assert [(r["scope"], r["length"], r["attention"]) for r in records] == [
        ("layer", n, name) for n in (64, 128) for name in ("softmax", "linear")] + [
        ("step", 64, "softmax"), ("step", 64, "linear")]
    for record in records:
        for key, kind in REQUIRED.items():
            assert isinstance(record[key], kind), (key, record[key])
        assert record["time_ms"] > 0 and record["peak_bytes"] > 0 and not record["oom"]
        assert record["memory_source"] == "compiled"  # the CPU keeps no memory statistics
        assert record["tokens_per_s"] == pytest.approx(
            record["batch"] * record["length"] / (record["time_ms"] / 1e3))
    step = _find(records, "step", "linear", 64)
    assert (step["heads"], step["head_dim"], step["num_layers"], step["emb_dim"]) == (2, 8, 1, 16)


def test_speedups_are_relative_to_softmax(full_run):
    _, records = full_run
    for scope, length in (("layer", 64), ("layer", 128), ("step", 64)):
        softmax = _find(records, scope, "softmax", length)
        linear = _find(records, scope, "linear", length)
        assert softmax["speedup_vs_softmax"] == 1.0 and softmax["exact_baseline"] == "softmax"
        assert linear["speedup_vs_softmax"] == pytest.approx(
            softmax["time_ms"] / linear["time_ms"])
        assert linear["speedup_vs_exact"] == linear["speedup_vs_softmax"]


def test_flops_count_the_quadratic_core(full_run):
    _, records = full_run
    small, large = (_find(records, "layer", "softmax", n) for n in (64, 128))
    assert 0 < small["flops"] < large["flops"]
    for record in (small, large):
        # q k^T and p v forward; dp, dv, dq, dk backward: 6 products of 2 * B H L^2 D FLOPs.
        assert record["dot_flops"] == 6 * 2 * 1 * 2 * record["length"] ** 2 * 8
        rate = record["dot_flops"] / (record["time_ms"] / 1e3)
        assert record["matmul_fraction"] == pytest.approx(rate / record["matmul_flops_per_s"])
    step = _find(records, "step", "softmax", 64)
    assert step["dot_flops"] > small["dot_flops"] // 2  # + projections, MLP, head


def test_tables_and_plots_are_written(full_run):
    out, _ = full_run
    layer, step = ((out / scope / "bench.md").read_text() for scope in ("layer", "step"))
    assert "steps/s 64" in layer and "MiB 128" in layer and "| linear |" in layer
    assert "Training step: encoder of 1 layer, width 16" in step
    for scope in ("layer", "step"):
        png = (out / scope / f"bench_{scope}.png").read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_dot_flops_multiplies_scan_bodies_and_takes_the_larger_branch():
    a = jnp.ones((4, 8))
    b = jnp.ones((8, 16))
    assert bench.dot_flops(jnp.matmul, a, b) == 2 * 4 * 8 * 16

    def scanned(a, b):
        def body(carry, _):
            return carry + (a @ b).sum(), None
        return jax.lax.scan(body, 0.0, None, length=7)[0]

    assert bench.dot_flops(jax.jit(scanned), a, b) == 7 * 2 * 4 * 8 * 16

    def branches(a, b, flag):
        return jax.lax.cond(flag, lambda: (a @ b @ b.T).sum(), lambda: (a @ b).sum())

    assert bench.dot_flops(branches, a, b, True) == 2 * 4 * 8 * 16 + 2 * 4 * 16 * 8


def test_over_budget_is_recorded_as_oom_without_running(tmp_path):
    records = bench.main(["--attention", "linear", "--lengths", "64", "--scopes", "layer",
                          "--baselines", "softmax", "--memory_budget_gb", "1e-9", *TINY,
                          "--out", str(tmp_path)])
    assert len(records) == 2
    for record in records:
        assert record["oom"] and record["time_ms"] is None and record["peak_bytes"] > 1
        assert record["speedup_vs_softmax"] is None and "budget" in record["error"]
    text = (tmp_path / "bench.md").read_text()
    assert "OOM (needs" in text and (tmp_path / "bench_layer.png").exists()


def test_resource_exhausted_at_run_time_is_an_oom_record(monkeypatch):
    def exhausted(*args, **kwargs):
        raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 1 TiB")

    monkeypatch.setattr(bench, "_timed_runs", exhausted)
    settings = bench.Settings(heads=2, head_dim=8, repeats=1)
    prepared = bench.prepare("softmax", "layer", 32, settings, {"device": "cpu"})
    record = bench.execute(prepared, settings, matmul_peak=1e9)
    assert record["oom"] and record["time_ms"] is None
    assert record["error"].startswith("RESOURCE_EXHAUSTED")


def _record(name, time_ms, length=1024, oom=False):
    return {"attention": name, "scope": "step", "length": length, "batch": 1,
            "dtype": "float32", "causal": False, "time_ms": None if oom else time_ms,
            "steps_per_s": None if oom else 1e3 / time_ms,
            "oom": oom, "speedup_vs_softmax": None, "speedup_vs_exact": None,
            "exact_baseline": None}


def test_speedups_against_softmax_and_the_fastest_exact_attention():
    records = bench.add_speedups([
        _record("softmax", 10.0), _record("memory_efficient:chunk_size=128", 5.0),
        _record("linear", 2.0), _record("softmax", None, 4096, oom=True),
        _record("linear", 8.0, 4096)])
    linear = records[2]
    assert linear["speedup_vs_softmax"] == 5.0 and linear["speedup_vs_exact"] == 2.5
    assert linear["exact_baseline"] == "memory_efficient:chunk_size=128"
    assert records[4]["speedup_vs_softmax"] is None and records[4]["speedup_vs_exact"] is None
    assert "softmax OOM" in output._speed_cell(records[4], records[3])


def test_device_peak_counts_only_when_the_program_raised_it():
    stats = iter([{"peak_bytes_in_use": 100}, {"peak_bytes_in_use": 250},
                  {"peak_bytes_in_use": 250}, {"peak_bytes_in_use": 250}])
    assert bench.peak_raised(lambda: next(stats), lambda: None) == 250
    assert bench.peak_raised(lambda: next(stats), lambda: None) is None
    assert bench.peak_raised(lambda: None, lambda: None) is None  # CPU: no statistics


def test_with_device_statistics_programs_run_by_increasing_compiled_peak(monkeypatch):
    peaks = iter(range(10**9, 2 * 10**9, 1000))  # every program raises the peak
    monkeypatch.setattr(bench, "_memory_stats", lambda: {"peak_bytes_in_use": next(peaks)})
    timed = []
    monkeypatch.setattr(bench, "_timed_runs", lambda compiled, *a: timed.append(compiled) or [1.0])
    settings = bench.Settings(heads=2, head_dim=8, repeats=1)
    records = bench.run(["softmax", "linear"], ["layer"], [128, 64], settings, matmul_peak=1e9)
    assert [(r["attention"], r["length"]) for r in records] == [
        ("softmax", 128), ("linear", 128), ("softmax", 64), ("linear", 64)]
    assert all(r["memory_source"] == "device" and r["peak_bytes"] >= 10**9 for r in records)
    assert len(timed) == 4
    # The fake peak grows with every reading, so device peaks follow the order of running.
    by_run = [r["compiled_peak_bytes"] for r in sorted(records, key=lambda r: r["peak_bytes"])]
    assert by_run == sorted(by_run) and by_run != [r["compiled_peak_bytes"] for r in records]


def test_step_config_overrides_sizes_and_options():
    settings = bench.Settings(step_batch=3, step_layers=2, step_emb_dim=32, step_qkv_dim=16,
                              step_heads=4, step_mlp_dim=64, step_dropout=0.0, causal=True)
    config = bench.step_config("linear:chunk_size=32", 256, settings)
    assert (config.max_length, config.batch_size, config.attention) == (256, 3, "linear")
    model = config.model
    assert (model.num_layers, model.emb_dim, model.qkv_dim, model.num_heads) == (2, 32, 16, 4)
    assert model.attention_options["chunk_size"] == 32 and model.pooling == "last"
    with pytest.raises(ValueError, match="qkv_dim"):
        bench.step_config("linear", 256, bench.Settings(step_qkv_dim=30, step_heads=4))


def test_step_entry_may_be_a_per_layer_pattern():
    """A hybrid entry builds the pattern's model; its options go to the first name."""
    from lra.models import pattern

    settings = bench.Settings(step_layers=4, step_emb_dim=16, step_qkv_dim=16, step_heads=2,
                              step_mlp_dim=32)
    config = bench.step_config("gated_deltanet+gated_deltanet+softmax+softmax:chunk_size=16",
                               128, settings)
    assert config.attention == "gated_deltanet"
    assert config.model.attention_options["chunk_size"] == 16
    names = [layer.name for layer in pattern.layer_mixers(config.model, config.attention)]
    assert names == ["gated_deltanet", "gated_deltanet", "softmax", "softmax"]


def test_loop_scope_times_the_training_loop_of_a_config(tmp_path):
    """The real loop of a tiny ListOps config: steps/s, the bare step's and the host share."""
    from configs import listops
    from lra import tasks
    from lra.training import data
    from tests.test_train import TINY

    data_dir = tmp_path / "listops"
    config = listops.get_config("runlocal")
    for key, value in TINY.items():
        if key.startswith("prepare."):
            config.prepare[key.split(".")[1]] = value
    data.ensure_prepared(tasks.get("listops"), str(data_dir), config.prepare)
    overrides = {**TINY, "data_dir": str(data_dir)}
    (record,) = bench.main(["--scopes", "loop", "--loop_steps", "3", "--loop_warmup", "2",
                            "--repeats", "2", "--out", str(tmp_path / "out"), "--loop_set",
                            ",".join(f"{key}={value}" for key, value in overrides.items())])
    assert (record["scope"], record["task"], record["batch"], record["length"]) == (
        "loop", "listops", 16, 64)
    assert len(record["rounds"]) == 2 and record["steps_per_s"] > 0
    assert record["time_ms"] == pytest.approx(1e3 / record["steps_per_s"])
    assert record["step_steps_per_s"] > 0 and 0 <= record["host_share"] < 1
    assert json.loads((tmp_path / "out" / "bench.json").read_text()) == [record]
    assert "| configs/listops.py:runlocal | listops / softmax | 16 x 64 |" in (
        tmp_path / "out" / "bench.md").read_text()


@pytest.mark.parametrize("argv, match", [
    (["--scopes", "layer,epoch"], "unknown scope"),
    (["--lengths", "64,-1"], "positive integers"),
    (["--scopes", "loop", "--loop_steps", "0"], "--loop_steps.*positive integers"),
    (["--attention", "softmx"], "unknown attention"),
    (["--attention", "linear+softmax", "--scopes", "layer,step"], "only in the step scope"),
    (["--attention", "linear+softmax+softmax", "--scopes", "step"], "not a multiple"),
])
def test_bad_arguments_fail_before_measuring(argv, match):
    with pytest.raises(ValueError, match=match):
        bench.main(argv)
