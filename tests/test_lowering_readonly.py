"""Lowering only reads: ``export`` (every target, every artefact form) leaves the quantized model's state_dict,
quantizer fields and graph exactly as they were; a model whose scales break a target's rules after calibration
is refused with the rule named, not changed, and the pass that fixes it is a pass the user runs."""
import copy

import pytest
import torch
from torch import nn

import quantfx
from quantfx.graph import qmeta
from quantfx.lowering import BACKENDS
from quantfx.pass_infra import PassManager, get_pass
from quantfx.quant import Quantizer
from quantfx.targets import dpu


class Block(nn.Module):
    """conv/BN/ReLU, a residual add, a concat, an average pool and a linear layer: every kind a lowering emits."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.body = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8))
        self.side = nn.Conv2d(8, 8, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = self.stem(x)
        y = torch.relu(self.body(x) + x)
        z = torch.cat([y, self.side(y)], 1)
        return self.fc(torch.flatten(self.pool(z), 1))


DATA = [torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(i)) for i in range(2)]
_QUANTIZER_ATTRS = ("fixed_scale", "scale_step", "bit_width", "signed", "narrow_range", "is_quant_enabled")


def _quantized(target):
    torch.manual_seed(0)
    return quantfx.quantize(Block().eval(), target, calibration_data=DATA, progress=False)


def _snapshot(q) -> dict:
    """Everything of a compiled model that a lowering could change, copied."""
    quantizers = {}
    for name, m in q.named_modules():
        if isinstance(m, Quantizer):
            fields = {k: copy.deepcopy(getattr(m, k, None)) for k in sorted(set(m.spec_fields) | set(_QUANTIZER_ATTRS))}
            quantizers[name] = fields
    metas = {}
    for n in q.graph.nodes:
        meta = n.meta.get("quant")
        if meta is not None:
            metas[n.name] = (meta.kind, meta.bit_width, meta.signed, meta.narrow, meta.quantizer, meta.group,
                             None if meta.scale is None else meta.scale.clone(),
                             None if meta.zero_point is None else meta.zero_point.clone())
    return {"state": {k: v.detach().clone() for k, v in q.state_dict().items()}, "quantizers": quantizers,
            "graph": str(q.graph), "code": q.code, "meta": metas, "notes": copy.deepcopy(q.notes),
            "training": q.training, "parameters": [n for n, _ in q.named_parameters()]}


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype and \
            a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _differences(before: dict, after: dict) -> list:
    out = []
    for part in before:
        if isinstance(before[part], dict):
            out += [f"{part}: {k}" for k in before[part].keys() | after[part].keys()
                    if not _same(before[part].get(k), after[part].get(k))]
        elif not _same(before[part], after[part]):
            out.append(part)
    return out


FORMS = [(name, None) for name in sorted(BACKENDS)] + \
    [(name, form) for name in sorted(BACKENDS) for form in sorted(BACKENDS[name].formats)]


@pytest.mark.parametrize("target,form", FORMS, ids=[f"{t}-{f or 'default'}" for t, f in FORMS])
def test_export_leaves_the_quantized_model_unchanged(target, form, tmp_path):
    q = _quantized(target)
    before = _snapshot(q)
    assert before["quantizers"] and before["state"] and before["meta"]
    quantfx.export(q, tmp_path / "model", DATA[0][:1], format=form)
    assert _differences(before, _snapshot(q)) == []


def test_dpu_fast_form_leaves_the_model_unchanged():
    q = _quantized("dpu")
    before = _snapshot(q)
    dpu.fast_form(q, (DATA[0][:1],))
    assert _differences(before, _snapshot(q)) == []


def test_snapshot_sees_a_moved_position():
    """The comparison can fail: moving one fix position (what refine used to do inside the lowering) shows."""
    q = _quantized("dpu")
    before = _snapshot(q)
    dpu.positions.set_pos(next(m.weight_quant for m in q.modules() if hasattr(m, "weight_quant")), 3)
    assert _differences(before, _snapshot(q)) != []


def test_dpu_position_rule_broken_after_calibration_is_refused_not_fixed():
    """Scales a user moved after calibration so that a layer's shift_cut leaves [0, 16]: export names the rule and
    leaves the model as it is; the pass refine_fix_positions (what calibration runs) makes it legal."""
    q = _quantized("dpu")
    layer_node = next(n for n in q.graph.nodes if n.op == "call_module" and hasattr(q.get_submodule(n.target),
                                                                                     "weight_quant"))
    layer = q.get_submodule(layer_node.target)
    i = dpu.fix_pos(qmeta(layer_node.args[0]).scale)
    o = dpu.fix_pos(qmeta(next(iter(layer_node.users))).scale)
    dpu.positions.set_pos(layer.weight_quant, o - i + 20)  # shift_cut = w + i - o = 20 > 16
    quantfx.annotate(q)
    before = _snapshot(q)
    with pytest.raises(quantfx.TargetError, match=r"shift_cut = w \+ i - o = 20 is outside \[0, 16\].*"
                                                  r"refine_fix_positions"):
        quantfx.lower(q, DATA[0][:1])
    assert _differences(before, _snapshot(q)) == []
    PassManager([get_pass("refine_fix_positions")()]).run(q)
    assert dpu.position_problems(q) == []
    report = quantfx.verify(q, quantfx.lower(q, DATA[0][:1]), DATA[0])
    assert report.ok and report.max_error_lsb == 0.0, report
