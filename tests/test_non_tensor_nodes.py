"""Only tensors get quantizers: nodes that compute on shapes, Python scalars or booleans (``x.shape``, ``h == 16``,
``torch._assert``, ``h / 16``) pass through every pass and every lowering untouched (a vision transformer's
input-size check crashed calibration with "'bool' object has no attribute 'detach'")."""
import pytest
import torch
from torch import nn

import quantfx
from quantfx.export import BACKENDS
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
    quantized_inputs = {n.args[0].name for n in q.graph.nodes if is_act_quant(q, n)}
    assert not quantized_inputs & {"eq", "truediv", "getattr_1", "getitem_2"}, quantized_inputs
    assert any(n.target is torch._assert for n in q.graph.nodes)
    report = quantfx.verify(q, quantfx.lower(q, (data[0][:1],)), data[1])
    assert report.max_error_lsb == 0.0, str(report)
    with pytest.raises(Exception, match="expected 16x16"):
        q(torch.randn(1, 3, 8, 8))  # the check still runs in the quantized model
