"""The speed benchmarks' --quick smoke runs (issue 6) and the measurement helpers they rely on.

Speed is never asserted: only that each script runs, writes JSON / its markdown section / the plot with the
expected fields, and that the hardware-independent facts it reports hold (fused operator count constant in N,
growing for the loop; saved activations affine in N; parameter counts equal to the closed-form counts).
"""

import json

import pytest
import torch

from benchmarks import expert_bank, train_step
from benchmarks._speed import count_ops, interleaved_times, peak_step_bytes, saved_activation_bytes

OTHER_SECTION = "<!-- BEGIN cca -->\nanother helper's section\n<!-- END cca -->"


@pytest.fixture
def keep_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_expert_bank_quick(tmp_path, keep_threads):
    out, md, png = tmp_path / "eb.json", tmp_path / "benchmarks.md", tmp_path / "sweep.png"
    md.write_text(f"# Benchmarks\n\n{OTHER_SECTION}\n")
    expert_bank.main(["--quick", "--out-json", str(out), "--out-md", str(md), "--out-plot", str(png)])
    data = json.loads(out.read_text())
    assert data["benchmark"] == "expert_bank" and data["quick"] is True
    assert {"cpu", "torch_threads", "torch"} <= data["machine"].keys()
    assert len(data["load_avg_start"]) == 3 and len(data["load_avg_end"]) == 3
    cpu = data["devices"]["cpu"]
    assert cpu["threads"] == 1
    for key in ("fp32_eager", "structure", "n_sweep", "bf16_eager", "compile", "profile"):
        assert key in cpu, key
    for r in cpu["fp32_eager"] + cpu["bf16_eager"] + cpu["n_sweep"]:
        assert {"N", "d", "h", "out", "B"} <= r.keys()
        for v in expert_bank.VARIANTS:
            assert r[f"{v}_ms"] > 0 and r[f"{v}_wall_ms"] > 0
        assert r["fused_vs_loop"] == pytest.approx(r["fused_ms"] / r["loop_ms"])
        assert r["fused_vs_dense"] == pytest.approx(r["fused_ms"] / r["dense_ms"])
    sweep = cpu["n_sweep"]
    ns = [r["N"] for r in sweep]
    fused_ops = [r["ops"]["fused"] for r in sweep]
    loop_ops = [r["ops"]["loop"] for r in sweep]
    assert len(set(fused_ops)) == 1 and data["goals"]["op_count_constant_in_N"] is True
    assert all(a < b for a, b in zip(loop_ops, loop_ops[1:]))
    # saved activations grow affinely in N, and the fused bank keeps no more than the loop (about half: the
    # fused BatchNorm+ReLU+Linear node recomputes the ReLU output instead of keeping it)
    saved = [r["saved_mb"]["fused"] * 2**20 for r in sweep]
    slope = (saved[1] - saved[0]) / (ns[1] - ns[0])
    assert all(s == pytest.approx(saved[0] + slope * (n - ns[0])) for n, s in zip(ns, saved))
    assert all(r["saved_mb"]["fused"] <= r["saved_mb"]["loop"] for r in sweep)
    for r in cpu["structure"]:
        assert r["peak_step_mb"]["fused"] is None or r["peak_step_mb"]["fused"] > 0
    prof = cpu["profile"]["fused"]
    assert prof["ms_per_step"]["gemm"] > 0 and sum(prof["share"].values()) == pytest.approx(1.0)
    assert [a["setting"] for a in data["allocators"]] == ["glibc-tuned"]
    tuned = data["allocators"][0]
    assert tuned["env"]["MALLOC_TOP_PAD_"] == "1073741824"
    assert [c["name"] for c in tuned["fp32_eager"]] == [c["name"] for c in cpu["fp32_eager"]]
    goals = data["goals"]["cpu_fp32_eager"]
    assert [g["target_vs_loop"] for g in goals] == [1.0, 0.8]
    text = md.read_text()
    assert OTHER_SECTION in text and text.count("<!-- BEGIN expert_bank -->") == 1
    assert "| config | (N, d, h, out, B) | fused ms |" in text and data["machine"]["cpu"] in text
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_train_step_quick(tmp_path, keep_threads):
    out, md = tmp_path / "ts.json", tmp_path / "benchmarks.md"
    md.write_text(f"# Benchmarks\n\n{OTHER_SECTION}\n")
    train_step.main(["--quick", "--out-json", str(out), "--out-md", str(md)])
    data = json.loads(out.read_text())
    assert data["benchmark"] == "train_step" and data["quick"] is True
    r = data["cpu"]
    assert set(r["step_ms"]) == set(train_step.VARIANTS) and all(v > 0 for v in r["step_ms"].values())
    assert r["ratios"]["star_vs_equimod"] == pytest.approx(r["step_ms"]["star"] / r["step_ms"]["equimod"])
    assert r["goal"]["target"] == 1.15 and r["goal"]["met"] == (r["goal"]["star_vs_equimod"] <= 1.15)
    # closed-form parameter counts (quick: ConvNet width 8 -> d = 64, N = 4 experts, EquiMod hidden 64, out 128)
    d, n, h, o, t = r["feature_dim"], 4, r["feature_dim"], 128, 2
    assert d == 64
    star_head = n * (d * h + h * h + h * o + o) + 2 * 2 * n * h + (d * t * n + t * n)
    e = 64
    equimod_head = 2 * (d * e + e * e + e * o + 2 * 2 * e)  # two heads, last Linear without bias, last BN affine-free
    assert r["params"]["star"]["head"] == star_head
    assert r["params"]["equimod"]["head"] == equimod_head
    assert r["params"]["simclr"]["head"] == equimod_head // 2
    assert len({p["backbone"] for p in r["params"].values()}) == 1
    assert all(v > 0 for v in r["saved_mb"].values())
    cca = r["cca_logging"]
    assert cca["compute_ms"] > 0 and set(cca["per_step_ms"]) == {"1", "10", "100"}
    assert cca["per_step_ms"]["1"] > cca["per_step_ms"]["10"] > cca["per_step_ms"]["100"]
    text = md.read_text()
    assert OTHER_SECTION in text and "<!-- BEGIN train_step -->" in text and "| variant | step ms |" in text


# ------------------------------------------------------------------ helpers against hand-computed values
def test_count_ops_and_saved_bytes_match_hand_counts():
    a = torch.randn(5, 3, requires_grad=True)
    b = torch.randn(3, 4)

    def step():
        y = (a @ b).exp()  # mm saves a (input, excluded) and b; exp saves its output [5, 4]
        y.sum().backward()

    def forward_only():
        with torch.no_grad():
            (a @ b).exp().sum()  # three aten ops: mm, exp, sum

    assert count_ops(forward_only) == 3
    assert count_ops(step) > 3 and count_ops(step) == count_ops(step)
    # saved for backward: b (needed for a's gradient) and exp's output; a itself is not needed
    assert saved_activation_bytes(step, [a, b]) == 5 * 4 * 4
    assert saved_activation_bytes(step, [a]) == 5 * 4 * 4 + 3 * 4 * 4


def test_peak_step_bytes_sees_a_temporary():
    def step():
        t = torch.ones(1_000_000)  # 4 MB, freed at return
        t.add_(1)

    peak = peak_step_bytes(step, torch.device("cpu"))
    if peak is None:
        pytest.skip("glibc mallinfo2 unavailable")
    assert 4_000_000 <= peak < 6_000_000


def test_interleaved_times_rotates_order():
    calls = []
    steps = {k: (lambda k=k: calls.append(k)) for k in "abc"}
    times = interleaved_times(steps, repeats=3, warmup=1, device=torch.device("cpu"))
    assert "".join(calls) == "abc" + "abc" + "bca" + "cab"
    assert all(len(v["wall"]) == len(v["cpu"]) == 3 for v in times.values())
