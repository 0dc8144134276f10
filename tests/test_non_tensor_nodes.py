"""Only tensors get quantizers: nodes that compute on shapes, Python scalars or booleans (``x.shape``, ``h == 16``,
``torch._assert``, ``h / 16``) pass through every pass and every lowering untouched (a vision transformer's
input-size check crashed calibration with "'bool' object has no attribute 'detach'")."""
import operator

import pytest
import torch
from torch import nn

import quantfx
from quantfx.export import BACKENDS
from quantfx.classify import TENSOR_KEY
from quantfx.graph import is_act_quant


class SizeChecked(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        n, c, h, w = x.shape
        torch._assert(h == 16, "expected 16x16 inputs")
        y = torch.relu(self.conv(x)).mean((2, 3)) * (h / 16)
        return self.fc(y)


@pytest.mark.parametrize("target", sorted(BACKENDS))
def test_shape_checks_and_scalars_get_no_quantizer(target):
    torch.manual_seed(0)
    data = [torch.randn(2, 3, 16, 16) for _ in range(3)]
    q = quantfx.quantize(SizeChecked().eval(), target, calibration_data=data, progress=False)
    scalars = [n for n in q.graph.nodes if n.meta.get(TENSOR_KEY) is False]
    assert {n.target for n in scalars} >= {operator.eq, operator.truediv, getattr}, scalars  # shape propagation saw them
    quantized = [n.args[0] for n in q.graph.nodes if is_act_quant(q, n)]
    assert not set(quantized) & set(scalars), [n.name for n in quantized]
    assert any(n.target is torch._assert for n in q.graph.nodes)
    report = quantfx.verify(q, quantfx.lower(q, (data[0][:1],)), data[1])
    assert report.max_error_lsb == 0.0, str(report)
    with pytest.raises(Exception, match="expected 16x16"):
        q(torch.randn(1, 3, 8, 8))  # the check still runs in the quantized model
