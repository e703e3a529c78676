"""benchmarks/_common.py: the measurements against hand-computed values, the section writer, the output rule."""

from __future__ import annotations

import pytest
import torch

from benchmarks._common import DOCS, count_ops, interleaved, output_dir, peak_bytes, saved_bytes, table, write_section


def test_count_ops_and_saved_bytes_match_hand_counts():
    a = torch.randn(5, 3, requires_grad=True)
    b = torch.randn(3, 4)

    def step():
        (a @ b).exp().sum().backward()  # mm saves b (for a's gradient); exp saves its output [5, 4]

    def forward_only():
        with torch.no_grad():
            (a @ b).exp().sum()  # mm, exp, sum

    assert count_ops(forward_only) == 3
    assert count_ops(step) > 3
    assert saved_bytes(step, [a, b]) == 5 * 4 * 4
    assert saved_bytes(step, [a]) == 5 * 4 * 4 + 3 * 4 * 4


def test_peak_bytes_sees_a_temporary():
    def step():
        t = torch.ones(1_000_000)  # 4 MB, freed before the step returns
        t.add_(1)

    peak = peak_bytes(step)
    if peak is None:
        pytest.skip("glibc mallinfo2 unavailable")
    assert 4_000_000 <= peak < 6_000_000


def test_interleaved_rotates_the_order_and_keeps_every_repeat():
    calls = []
    steps = {k: (lambda k=k: calls.append(k)) for k in "abc"}
    times = interleaved(steps, repeats=3, warmup=1)
    assert "".join(calls) == "abc" + "abc" + "bca" + "cab"
    assert all(len(v["cpu_all_ms"]) == 3 and v["cpu_ms"] >= 0 for v in times.values())


def test_write_section_replaces_only_its_own_block(tmp_path):
    md = tmp_path / "b.md"
    md.write_text("# T\n\nhand-written\n\n<!-- BEGIN x -->\nold\n<!-- END x -->\n\n<!-- BEGIN y -->\nother\n<!-- END y -->\n")
    write_section(md, "x", "new")
    write_section(md, "z", "appended")
    text = md.read_text()
    assert "old" not in text and "<!-- BEGIN x -->\nnew\n<!-- END x -->" in text
    assert text.startswith("# T\n\nhand-written") and "other" in text and text.rstrip().endswith("<!-- END z -->")


def test_quick_output_never_goes_to_docs(tmp_path):
    assert output_dir(None, quick=False) == DOCS
    quick = output_dir(None, quick=True)
    assert quick.is_dir() and DOCS not in quick.parents and quick != DOCS
    quick.rmdir()
    assert output_dir(tmp_path, quick=True) == tmp_path


def test_table_formats_floats_and_missing_values():
    assert table([{"a": 1.23456, "b": None}], {"a": "A", "b": "B"}) == "| A | B |\n|---|---|\n| 1.23 | n/a |"
