"""Parameter/FLOP counts, width fitting, parameter-matched baselines and build_head(match_params=True)."""

import importlib.util
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from star_heads import SeparateHeads, SharedSpecificHead, STARHead, build_head
from star_heads.sizing import (
    DROP_IN_FACTOR,
    FLOP_RTOL,
    PARAM_RTOL,
    count_parameters,
    drop_in_hidden_dim,
    fit_width,
    linear_macs,
)

ROOT = Path(__file__).resolve().parents[2]


def _mlp_params(d, h, o, layers, tasks_or_experts):
    """Closed form of one STAR-style MLP (no hidden bias, BN affine, last bias) times its count."""
    sizes = [d] + [h] * (layers - 1) + [o]
    one = sum(a * b for a, b in zip(sizes, sizes[1:])) + 2 * h * (layers - 1) + o
    return tasks_or_experts * one


@given(d=st.integers(1, 40), h=st.integers(1, 40), o=st.integers(1, 20), layers=st.integers(2, 4), n=st.integers(1, 6))
@settings(max_examples=25, deadline=None)
def test_counts_match_closed_forms(d, h, o, layers, n):
    star = STARHead(d, o, num_experts=n, hidden_dim=h, num_layers=layers, device="meta")
    assert count_parameters(star) == _mlp_params(d, h, o, layers, n) + 2 * n * (d + 1)  # + router Linear(d -> 2N)
    sizes = [d] + [h] * (layers - 1) + [o]
    macs = sum(a * b for a, b in zip(sizes, sizes[1:]))
    assert linear_macs(star) == n * macs + d * 2 * n
    sep = SeparateHeads(d, h, o, layers, device="meta")
    assert count_parameters(sep) == _mlp_params(d, h, o, layers, 2) and linear_macs(sep) == 2 * macs


@pytest.mark.parametrize("make", [lambda: STARHead(12, 6, num_experts=3), lambda: SeparateHeads(12, 10, 6),
                                  lambda: SharedSpecificHead(12, 10, 6)])
def test_linear_macs_equal_torch_flop_counter(make):
    """torch's FlopCounterMode counts 2 FLOPs per multiply-add of every matmul; the gate mixture (a bmm of
    T·N·o per sample, not a Linear) is the only matmul linear_macs leaves out."""
    head, b = make().eval(), 5
    with FlopCounterMode(display=False) as counter:
        head(torch.randn(b, 12))
    n = getattr(head, "num_experts", 3 if isinstance(head, SharedSpecificHead) else 0)
    mixture = 0 if isinstance(head, SeparateHeads) else 2 * n * 6
    assert counter.get_total_flops() == 2 * b * (linear_macs(head) + mixture)


@given(a=st.integers(1, 50), c=st.integers(0, 50), budget=st.integers(1, 20_000), m=st.integers(1, 4))
@settings(max_examples=40, deadline=None)
def test_fit_width_against_brute_force(a, c, budget, m):
    """Widths of nn.Linear(a, w) -> nn.Linear(w, c+1): count = w·(a + c + 2) + c + 1, monotone in w."""

    def build(w):
        return nn.Sequential(nn.Linear(a, w, device="meta"), nn.Linear(w, c + 1, device="meta"))

    counts = {w: w * (a + c + 2) + c + 1 for w in range(m, budget + 2 * m, m)}  # closed form of build(w)
    nearest = fit_width(build, budget, multiple_of=m)
    best = min(abs(v - budget) for v in counts.values())
    assert nearest % m == 0 and abs(counts[nearest] - budget) == best
    fitting = [w for w, v in counts.items() if v <= budget]
    if fitting:
        assert fit_width(build, budget, mode="at_most", multiple_of=m) == max(fitting)
    else:
        with pytest.raises(ValueError, match="no hidden_dim fits"):
            fit_width(build, budget, mode="at_most", multiple_of=m)


@pytest.mark.parametrize("d, n", [(16, 2), (64, 8), (128, 16)])
@pytest.mark.parametrize("cls", [SeparateHeads, SharedSpecificHead])
def test_param_matched_within_tolerances(d, n, cls):
    star = STARHead(d, num_experts=n)
    head = cls.param_matched(star, d)
    p, f = count_parameters(star), linear_macs(star)
    assert abs(count_parameters(head) - p) <= PARAM_RTOL * p
    assert abs(linear_macs(head) - f) <= FLOP_RTOL * f
    assert head.tasks == ("inv", "eq") and head.output_dim == 128
    # the chosen width is the nearest: one step either way is no closer
    for w in (head.hidden_dim - 1, head.hidden_dim + 1):
        other = cls(d, w, 128, device="meta") if w > 0 else None
        if other is not None:
            assert abs(count_parameters(other) - p) >= abs(count_parameters(head) - p)
    assert head(torch.randn(4, d), task="eq").shape == (4, 128)


def test_param_matched_int_reference_and_options():
    head = SeparateHeads.param_matched(100_000, 32, 16, 2, tasks=("a", "b", "c"), norm_layer=None, last_bias=False)
    # 3 MLPs of 32 -> h -> 16 with no norm and no bias: 3 · 48 · h
    assert count_parameters(head) == 3 * 48 * head.hidden_dim and abs(3 * 48 * head.hidden_dim - 100_000) <= 48 * 3
    assert head.tasks == ("a", "b", "c") and all(isinstance(m, nn.Identity) for m in head.heads["a"].norms)


def test_param_matched_refuses_what_it_cannot_match():
    with pytest.raises(ValueError, match="does not grow with hidden_dim"):
        SeparateHeads.param_matched(STARHead(16), 16, num_layers=1)
    with pytest.raises(ValueError, match=r"cannot size SeparateHeads to STARHead.*nearest hidden_dim=1"):
        SeparateHeads.param_matched(STARHead(4, 2, num_experts=1, hidden_dim=1), 64)
    with pytest.raises(TypeError, match="reference must be an int"):
        SeparateHeads.param_matched(1.5e6, 64)
    with pytest.raises(ValueError, match="reference must be >= 1"):
        SeparateHeads.param_matched(0, 64)


def test_build_head_match_params_sizes_against_the_star_head_of_the_same_arguments():
    sep = build_head("separate", 64, num_experts=16, match_params=True)
    star = build_head("star", 64, num_experts=16)
    assert isinstance(sep, SeparateHeads)
    assert abs(count_parameters(sep) - count_parameters(star)) <= PARAM_RTOL * count_parameters(star)
    torch.manual_seed(0)
    ref = SeparateHeads.param_matched(star, 64)
    assert sep.hidden_dim == ref.hidden_dim
    # options that change the STAR head's size change the match
    wide = build_head("separate", 64, num_experts=16, hidden_dim=128, match_params=True)
    assert wide.hidden_dim > sep.hidden_dim
    single = build_head("single", 64, num_experts=8, match_params=True)
    assert single.tasks == ("inv",)
    star8 = build_head("star", 64, num_experts=8)
    assert abs(count_parameters(single) - count_parameters(star8)) <= PARAM_RTOL * count_parameters(star8)
    shared = build_head("shared", 64, match_params=True, norm_layer=nn.LayerNorm)
    assert isinstance(shared, SharedSpecificHead)
    ln_star = build_head("star", 64, norm_layer=nn.LayerNorm)
    assert abs(count_parameters(shared) - count_parameters(ln_star)) <= PARAM_RTOL * count_parameters(ln_star)


def test_build_head_options_belong_to_a_kind():
    with pytest.raises(ValueError, match=r"\['num_experts'\] apply to kind 'star'.*not to kind 'separate'"):
        build_head("separate", 16, num_experts=4)
    with pytest.raises(ValueError, match=r"\['temperature'\] apply to kind 'star'.*not to kind 'shared'"):
        build_head("shared", 16, temperature=0.5)
    with pytest.raises(ValueError, match="does not apply to kind 'star'"):
        build_head("star", 16, match_params=True)
    with pytest.raises(TypeError, match="match_params must be a bool"):
        build_head("separate", 16, match_params=1)
    with pytest.raises(ValueError, match="takes no options"):
        build_head(nn.Linear(2, 2), 16, num_experts=3)
    with pytest.raises(TypeError, match="unexpected keyword argument 'widht'"):
        build_head("star", 16, widht=3)
    with pytest.raises(TypeError, match="kind must be one of"):
        build_head(3, 16)


def test_heads_doc_tables_are_up_to_date():
    spec = importlib.util.spec_from_file_location("make_heads_tables", ROOT / "docs" / "make_heads_tables.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    text = module.DOC.read_text()
    assert module.updated(text) == text, "run: python docs/make_heads_tables.py"


def _tables():
    spec = importlib.util.spec_from_file_location("make_heads_tables", ROOT / "docs" / "make_heads_tables.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_one_sizing_rule_over_every_entry_point():
    """The table of docs/heads.md: every entry point at most 2x the head it replaces, near the budget, with
    multiple-of-8 widths; the table lists every entry point."""
    tables = _tables()
    labels = " ".join(label for label, *_ in tables.ENTRY_POINTS)
    for name in ("STARSimCLRProjectionHead", "STARVICRegProjectionHead", "swap_projector", "replace_projection_head",
                 "replace_projector", "build_head", "SimCLRAdapter", "VICRegAdapter"):
        assert name in labels
    for label, _, replaced, star in tables.ENTRY_POINTS:
        ref, head = count_parameters(replaced()), star()
        params = count_parameters(head)
        assert params <= DROP_IN_FACTOR * ref, label
        assert params >= 1.8 * ref, label  # the budget is used, not wasted
        assert head.hidden_dim % 8 == 0 and head.num_experts == 8, label


def test_adapters_use_build_heads_sizing():
    from star_heads.adapters import SimCLRAdapter, VICRegAdapter

    for cls in (SimCLRAdapter, VICRegAdapter):
        adapter = cls(64)
        single = build_head("single", 64, output_dim=adapter.head.output_dim)
        assert count_parameters(adapter.head) <= DROP_IN_FACTOR * count_parameters(single)
        assert adapter.head.hidden_dim == build_head("star", 64, output_dim=adapter.head.output_dim).hidden_dim


@pytest.mark.parametrize("width", [8, 16])
def test_swap_projector_default_is_within_the_budget_at_small_widths(width):
    from star_heads.integrations.swap import swap_projector

    holder = nn.Module()
    holder.projector = nn.Sequential(nn.Linear(32, width, bias=False), nn.BatchNorm1d(width), nn.ReLU(), nn.Linear(width, 16))
    old = count_parameters(holder.projector)
    head = swap_projector(holder)
    assert count_parameters(head) <= DROP_IN_FACTOR * old
    assert head(torch.randn(3, 32)).shape == (3, 16)


def test_replace_projection_head_follows_the_rule():
    heads = pytest.importorskip("lightly.models.modules.heads")
    from star_heads.integrations.lightly import replace_projection_head

    model = nn.Module()
    model.projection_head = heads.SimCLRProjectionHead(64, 64, 32)
    old = count_parameters(model.projection_head)
    head = replace_projection_head(model)
    assert count_parameters(head) <= DROP_IN_FACTOR * old


def test_drop_in_hidden_dim_rounds_to_multiples_of_eight_where_it_can():
    def build(w):
        return nn.Linear(10, w, device="meta")  # 11 w parameters

    assert drop_in_hidden_dim(build, 11 * 40) == 80  # budget 880: width 80
    assert drop_in_hidden_dim(build, 11 * 41) == 80  # 82 fits, rounded down to 80
    assert drop_in_hidden_dim(build, 11 * 3) == 6  # below 8: any width
    with pytest.raises(ValueError, match="pass expert_hidden_dim= explicitly"):
        drop_in_hidden_dim(lambda w: nn.Linear(10, w + 100, device="meta"), 5)
