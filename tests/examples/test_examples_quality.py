"""benchmarks/quality.py: the --quick grid end to end, and the gate-specialisation summary by hand."""

import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "benchmarks"), str(ROOT / "examples")]
pytest.importorskip("kornia")
pytest.importorskip("sklearn")

import quality  # noqa: E402


def test_gate_specialisation_by_hand():
    g = [[0.5, 0.3, 0.1, 0.1], [0.1, 0.1, 0.3, 0.5]]
    s = quality.gate_specialisation(g)
    assert s["gate_tv"] == pytest.approx(0.5 * (0.4 + 0.2 + 0.2 + 0.4))
    # shares inv/(inv+eq): 0.83 → inv, 0.75 → inv, 0.25 → eq, 0.17 → eq
    assert (s["experts_inv"], s["experts_eq"], s["experts_shared"]) == (2, 2, 0)
    assert quality.gate_specialisation([[0.5, 0.5], [0.5, 0.5]])["experts_shared"] == 2
    assert quality.gate_specialisation(None)["gate_tv"] is None


def test_quick_grid_writes_json_and_markdown(tmp_path):
    md = tmp_path / "results.md"
    md.write_text("# Results\n\nkept text\n")
    rows = quality.main(["--quick", "--out-dir", str(tmp_path / "runs"), "--json", str(tmp_path / "q.json"),
                         "--md", str(md)])
    assert [(r["head"], r["num_experts"]) for r in rows] == quality.QUICK_CONFIGS
    data = json.loads((tmp_path / "q.json").read_text())
    assert data["quick"] and len(data["runs"]) == 3 and data["summary"][2]["head"] == "STAR N=2"
    rand, sep, star = data["runs"]
    assert star["gate_tv"] is not None and star["experts_inv"] + star["experts_eq"] + star["experts_shared"] == 2
    assert sep["gate_tv"] is None and sep["cca_mean"] is not None  # separate heads: CCA but no router
    assert rand["cca_mean"] is None and 0.0 <= rand["acc_shape"] <= 1.0  # untrained backbone, probed only
    ckpt = torch.load(tmp_path / "runs" / "random-s0" / "checkpoint.pt", weights_only=False)
    torch.manual_seed(0)
    from common.backbones import build_backbone

    fresh = build_backbone("convnet", width=quality.QUICK["width"])[0].state_dict()
    assert all(torch.equal(fresh[k], ckpt["backbone"][k]) for k in fresh)  # really the seeded initialisation
    text = md.read_text()
    assert "kept text" in text and "<!-- BEGIN quality -->" in text and "| STAR N=2 |" in text
    # A second call reuses the finished runs (same settings) instead of training again.
    again = quality.main(["--quick", "--out-dir", str(tmp_path / "runs"), "--json", str(tmp_path / "q.json"),
                          "--md", str(md)])
    assert [r["cca_mean"] for r in again] == [r["cca_mean"] for r in rows]
