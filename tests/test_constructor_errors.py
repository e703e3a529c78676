"""The promised exception types across the public constructors: ``TypeError`` for a value of the wrong type,
``ValueError`` for a value of the right type that is out of range or not a choice (``star_heads/_checks.py``),
raised at construction with a message naming the argument."""

import functools

import pytest
import torch
from torch import nn

import star_heads as sh
from star_heads.experts import ExpertBank
from star_heads.routing import SoftRouter

# (id, constructor, bad keyword arguments, expected exception, the argument the message names)
CASES = [
    # heads
    ("STARHead temperature type", lambda **k: sh.STARHead(8, **k), {"temperature": "a"}, TypeError, "temperature"),
    ("STARHead temperature value", lambda **k: sh.STARHead(8, **k), {"temperature": -1.0}, ValueError, "temperature"),
    ("STARHead num_experts type", lambda **k: sh.STARHead(8, **k), {"num_experts": 2.5}, TypeError, "num_experts"),
    ("STARHead num_experts value", lambda **k: sh.STARHead(8, **k), {"num_experts": 0}, ValueError, "num_experts"),
    ("STARHead tasks type", lambda **k: sh.STARHead(8, **k), {"tasks": "inv"}, TypeError, "tasks"),
    ("STARHead tasks value", lambda **k: sh.STARHead(8, **k), {"tasks": ("inv", "inv")}, ValueError, "tasks"),
    ("STARHead top_k type", lambda **k: sh.STARHead(8, **k), {"top_k": True}, TypeError, "top_k"),
    ("STARHead top_k value", lambda **k: sh.STARHead(8, **k), {"top_k": 9}, ValueError, "top_k"),
    ("STARHead norm_layer type", lambda **k: sh.STARHead(8, **k), {"norm_layer": nn.BatchNorm1d(8)}, TypeError, "norm_layer"),
    ("STARHead norm_layer InstanceNorm1d", lambda **k: sh.STARHead(8, **k), {"norm_layer": nn.InstanceNorm1d},
     TypeError, "norm_layer"),
    ("SeparateHeads last_norm_layer GroupNorm", lambda **k: sh.SeparateHeads(8, **k), {"last_norm_layer": nn.GroupNorm},
     TypeError, "last_norm_layer"),
    ("STARHead check_finite type", lambda **k: sh.STARHead(8, **k), {"check_finite": "no"}, TypeError, "check_finite"),
    ("MMoEHead hidden_dim type", lambda **k: sh.MMoEHead(8, output_dim=4, **k), {"hidden_dim": "a"}, TypeError, "hidden_dim"),
    ("MMoEHead output_dim value", lambda **k: sh.MMoEHead(8, 8, **k), {"output_dim": 0}, ValueError, "output_dim"),
    ("STARSimCLRProjectionHead batch_norm type", lambda **k: sh.STARSimCLRProjectionHead(16, 16, 8, **k),
     {"batch_norm": 1}, TypeError, "batch_norm"),
    ("STARSimCLRProjectionHead num_layers value", lambda **k: sh.STARSimCLRProjectionHead(16, 16, 8, **k),
     {"num_layers": 1}, ValueError, "num_layers"),
    ("STARVICRegProjectionHead expert_hidden_dim type", lambda **k: sh.STARVICRegProjectionHead(16, 16, 8, **k),
     {"expert_hidden_dim": 4.0}, TypeError, "hidden_dim"),
    # bank and router
    ("ExpertBank num_experts type", lambda **k: ExpertBank(input_dim=4, hidden_dim=5, output_dim=3, **k),
     {"num_experts": "2"}, TypeError, "num_experts"),
    ("ExpertBank hidden_bias type", lambda **k: ExpertBank(2, 4, 5, 3, **k), {"hidden_bias": "yes"}, TypeError, "hidden_bias"),
    ("ExpertBank act_layer value", lambda **k: ExpertBank(2, 4, 5, 3, **k), {"act_layer": nn.Softmax}, TypeError, "act_layer"),
    pytest.param("ExpertBank check_finite type", lambda **k: ExpertBank(2, 4, 5, 3, **k), {"check_finite": "no"},
                 TypeError, "check_finite"),
    pytest.param("ExpertBank norm_layer InstanceNorm1d", lambda **k: ExpertBank(2, 4, 5, 3, **k),
                 {"norm_layer": nn.InstanceNorm1d}, TypeError, "norm_layer"),
    ("SoftRouter temperature type", lambda **k: SoftRouter(4, 2, **k), {"temperature": "a"}, TypeError, "temperature"),
    ("SoftRouter conditional type", lambda **k: SoftRouter(4, 2, **k), {"conditional": 1}, TypeError, "conditional"),
    ("SoftRouter num_tasks value", lambda **k: SoftRouter(4, 2, **k), {"num_tasks": 0}, ValueError, "num_tasks"),
    # baselines and the factory
    ("SeparateHeads hidden_dim type", lambda **k: sh.SeparateHeads(8, **k), {"hidden_dim": "a"}, TypeError, "hidden_dim"),
    ("SeparateHeads num_layers value", lambda **k: sh.SeparateHeads(8, **k), {"num_layers": 0}, ValueError, "num_layers"),
    ("SharedSpecificHead tasks value", lambda **k: sh.SharedSpecificHead(8, **k), {"tasks": ()}, ValueError, "tasks"),
    ("build_head kind value", lambda **k: sh.build_head(input_dim=8, **k), {"kind": "moe"}, ValueError, "kind"),
    ("build_head match_params type", lambda **k: sh.build_head("separate", 8, **k), {"match_params": 1}, TypeError,
     "match_params"),
    # metrics
    ("CCAMeter ridge type", lambda **k: sh.CCAMeter(3, **k), {"ridge": "a"}, TypeError, "ridge"),
    ("CCAMeter ridge value", lambda **k: sh.CCAMeter(3, **k), {"ridge": -0.5}, ValueError, "ridge"),
    ("CCAMeter p type", lambda **k: sh.CCAMeter(**k), {"p": 3.0}, TypeError, "p"),
    ("CCAMeter null_baseline type", lambda **k: sh.CCAMeter(3, **k), {"null_baseline": "yes"}, TypeError, "null_baseline"),
    ("CCAMeter svcca_keep value", lambda **k: sh.CCAMeter(3, **k), {"svcca_keep": 1.5}, ValueError, "svcca_keep"),
    ("CCAMonitor every type", lambda **k: sh.CCAMonitor(**k), {"every": "a"}, TypeError, "every"),
    ("CCAMonitor every value", lambda **k: sh.CCAMonitor(**k), {"every": 0}, ValueError, "every"),
    # adapters, losses, augment, normaliser, predictor
    ("SimCLRAdapter lam type", lambda **k: sh.SimCLRAdapter(8, **k), {"lam": "a"}, TypeError, "lam"),
    ("SimCLRAdapter lam value", lambda **k: sh.SimCLRAdapter(8, **k), {"lam": -1.0}, ValueError, "lam"),
    pytest.param("SimCLRAdapter view_batching type", lambda **k: sh.SimCLRAdapter(8, **k), {"view_batching": 3},
                 TypeError, "view_batching"),
    ("SimCLRAdapter view_batching value", lambda **k: sh.SimCLRAdapter(8, **k), {"view_batching": "both"},
     ValueError, "view_batching"),
    pytest.param("VICRegLoss variance_convention type", lambda **k: sh.VICRegLoss(**k), {"variance_convention": 3},
                 TypeError, "variance_convention"),
    ("VICRegLoss variance_convention value", lambda **k: sh.VICRegLoss(**k), {"variance_convention": "torch"},
     ValueError, "variance_convention"),
    pytest.param("EquivariantNTXentLoss anchors type", lambda **k: sh.EquivariantNTXentLoss(**k), {"anchors": 3},
                 TypeError, "anchors"),
    pytest.param("AugParamNormalizer momentum type", lambda **k: sh.AugParamNormalizer(11, **k), {"momentum": "a"},
                 TypeError, "momentum"),
    ("AugParamNormalizer momentum value", lambda **k: sh.AugParamNormalizer(11, **k), {"momentum": 2.0},
     ValueError, "momentum"),
    pytest.param("EquivariantPredictor kind type", lambda **k: sh.EquivariantPredictor(4, 11, **k), {"kind": 3},
                 TypeError, "kind"),
    ("EquivariantPredictor kind value", lambda **k: sh.EquivariantPredictor(4, 11, **k), {"kind": "mlp"},
     ValueError, "kind"),
    pytest.param("STARAugment output_size type", lambda **k: sh.STARAugment(**k), {"output_size": "a"}, TypeError,
                 "output_size"),
    ("STARAugment output_size value", lambda **k: sh.STARAugment(**k), {"output_size": 0}, ValueError, "output_size"),
]


def _id(case):
    return case.values[0] if hasattr(case, "values") else case[0]


@pytest.mark.parametrize("name, build, kwargs, expected, argument", CASES, ids=[_id(c) for c in CASES])
def test_constructors_raise_the_promised_exception_type(name, build, kwargs, expected, argument):
    if name.startswith("STARAugment"):
        pytest.importorskip("kornia")
    with pytest.raises(Exception) as info:
        build(**kwargs)
    assert type(info.value) is expected or isinstance(info.value, expected), f"{name}: {info.value!r}"
    assert type(info.value) in (TypeError, ValueError)
    assert argument in str(info.value), f"{name}: the message does not name {argument!r}: {info.value}"


def test_one_message_style_for_numbers():
    """Every numeric check says 'must be a real number' (an int is accepted where a float is)."""
    for build in (functools.partial(sh.STARHead, 8, temperature="a"), functools.partial(sh.CCAMeter, 3, ridge="a"),
                  functools.partial(SoftRouter, 4, 2, temperature="a")):
        with pytest.raises(TypeError, match="must be a real number, got str 'a'"):
            build()
    assert sh.STARHead(8, temperature=1).router.temperature.item() == pytest.approx(1.0)
    assert torch.is_tensor(sh.STARHead(8, temperature=2).router.log_temperature)
