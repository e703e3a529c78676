"""benchmarks/cca.py --quick runs end to end and writes the documented JSON fields and markdown section."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_quick_benchmark_writes_json_and_section(tmp_path):
    pytest.importorskip("sklearn")
    out_json, out_md = tmp_path / "cca.json", tmp_path / "bench.md"
    out_md.write_text("# Benchmarks\n\nkeep me\n")
    subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "cca.py"), "--quick", "--out-json", str(out_json), "--out-md", str(out_md)],
        check=True, cwd=ROOT, capture_output=True, timeout=300,
    )
    data = json.loads(out_json.read_text())
    assert data["benchmark"] == "cca" and data["quick"] is True and "cpu" in data["machine"]
    assert len(data["rows"]) >= 2
    for row in data["rows"]:
        for key in ("n", "p", "ours_s", "meter_s", "numpy_s", "ours_abs_err", "meter_abs_err", "numpy_abs_err",
                    "numpy_over_ours", "null_mean"):
            assert key in row
        assert row["ours_s"] > 0 and row["ours_abs_err"] < 1e-8 and row["meter_abs_err"] < 1e-8
        assert 0 < row["null_mean"] < row["oracle_mean"]  # planted correlations sit above the null
    assert any("sklearn_s" in row and row["sklearn_over_ours"] > 0 for row in data["rows"])
    assert 0 < data["monitor"]["overhead_pct"] and data["monitor"]["every"] == 10
    nulls = [r["null_mean"] for r in data["null_table"]]
    assert nulls == sorted(nulls, reverse=True)
    md = out_md.read_text()
    assert "keep me" in md and "<!-- BEGIN cca -->" in md and "Monitor overhead" in md
