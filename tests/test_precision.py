"""lra.bench.precision: the float64 NumPy references against the cores, and `main`."""

import json

import numpy as np
import pytest

from lra.bench import precision

L, CHUNK = 64, 16  # four chunks: the carried state is exercised


@pytest.mark.parametrize("core", precision.CORES)
def test_reference_matches_core_in_float32(core):
    """The independent float64 recurrences agree with the float32 chunked cores (which
    also checks the references and the input conventions)."""
    inputs = precision.draw_inputs(core, L)
    ref = precision.reference(core, inputs)
    out = precision.run_core(core, inputs, CHUNK)
    assert out.shape == ref.shape == (L, precision.HEADS, precision.DIM)
    err = precision.errors(out, ref)
    assert err["rel_l2"] < 1e-5 and err["max_rel"] < 1e-5, err


def test_bfloat16_inputs_are_rounded_and_gates_are_not():
    inputs = precision.draw_inputs("kda", 8)
    low = precision.to_bfloat16("kda", inputs)
    assert {n: str(a.dtype) for n, a in low.items()} == {
        "q": "bfloat16", "k": "bfloat16", "v": "bfloat16", "beta": "float32",
        "log_alpha": "float32"}
    assert np.all(inputs["log_alpha"] <= 0) and np.all((0 < inputs["beta"]) & (inputs["beta"] < 1))
    np.testing.assert_allclose(np.linalg.norm(inputs["k"], axis=-1), 1.0, rtol=1e-6)


def test_main_writes_json_and_markdown(tmp_path):
    result = precision.main(["--lengths", str(L), "--chunk-size", str(CHUNK),
                             "--cores", "retnet,ssd", "--out", str(tmp_path)])
    written = json.loads((tmp_path / "precision.json").read_text())
    assert written["records"] == json.loads(json.dumps(result["records"]))
    records = {(r["core"], r["dtype"]): r for r in written["records"]}
    assert set(records) == {(c, d) for c in ("retnet", "ssd") for d in precision.DTYPES}
    for core in ("retnet", "ssd"):
        assert records[core, "float32"]["rel_l2"] < 1e-5
        low = records[core, "bfloat16"]
        assert 1e-4 < low["rel_l2"] < 3e-2  # bfloat16 inputs: visibly worse, still close
        assert low["rel_l2_rounded"] is not None and low["rel_l2_output_floor"] > 0
    table = (tmp_path / "precision.md").read_text()
    assert "| retnet | 64 | bfloat16 |" in table and "| ssd | 64 | float32 |" in table
