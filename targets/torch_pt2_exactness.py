"""Why the ``.pt2`` program gives the fake-quant model's integers, eagerly and under inductor, and where not.

Three runtimes compute one fused conv/linear ``q(relu(conv(dq(x), dq(w)) + b))`` of the program:

- **eager** (``ExportedProgram.module()``, and ``torch.compile`` without the int8 fusion passes): a float32
  conv / linear on the dequantized values ``(x - zp) x s_in`` and ``w x s_w``, the float bias added, then
  ``quantized_decomposed.quantize_per_tensor``: ``clamp(round(y x (1 / s_out)) + zp)``;
- **inductor with the x86 int8 passes** (torch 2.14 keeps the lowerings of ``onednn.qconv_pointwise`` /
  ``qlinear_pointwise`` in ``torch/_inductor``, but the freezing passes that fold the dequantize / conv /
  quantize pattern into them moved to torchao: ``torchao/quantization/pt2e/inductor_passes/x86.py``, registered
  when ``torchao.quantization.pt2e.quantizer.x86_inductor_quantizer`` is imported): the pattern's
  ``x_scale, x_zp``, per-channel ``w_scale``, float bias and the quantize op's ``scale, zp`` are handed to oneDNN,
  which accumulates ``u8 x s8`` in int32 and computes ``rne(fl(fl(acc x fl(s_in x s_w)) + b) x (1 / s_out)) + zp``,
  saturated to uint8 (a ReLU post-op before the output scale);
- **the fake-quant model** (``requant='multiplier_float_bias'``): ``rne(fl(acc + b_int) x m) + zp``, ``m = s_in
  x s_w / s_out``.

On the 'x86' / 'onednn' profiles (``exact_requant``: power-of-two activation scales, even zero points, ``m`` on
multiples of ``2^E``; :func:`targets.torch_quantized.exact_requant_problems` checks each layer) every float32 step
of oneDNN's formula is exact for an output in range, so inductor's kernels and the model agree (the argument the
TorchScript file's x86 engine rests on; the kernels are the same oneDNN primitives). Eager float32 has one more
step: its sums. Every product ``(x - zp) s_in x w s_w`` is an integer multiple of ``u = s_in x s_w`` (a power of two
times ``s_w``'s odd mantissa ``M``), so a partial sum is exact while ``|partial| / u x M < 2^24``: on the 2^-15
grid, while partial sums stay within ``2^9`` output steps. :func:`float32_sum_problems` says where a layer's worst
case passes that; a sum past it is off by a few ``u`` (``2^-15`` output steps each), which changes an output
only where the exact value is that close to a rounding tie. ``quantfx.verify`` measures it (eagerly and compiled).

Adds of two quantized values: both inputs dequantized exactly, one float32 add, ``x (1 / s_out)`` exact for a
power-of-two scale: the model's ``round((a + b) / s_out)`` in every runtime (inductor runs the dq / add / q as
vectorized elementwise code, rounding half to even).

Residual adds that read a conv's float output (``add_reads_layer_output``, the torch profile's x86 / onednn
engines; PT2E's recipe): the program is ``dq(x) -> conv(dq(w), b) -> add(., dq(other)) -> [relu] -> q``, which
torchao's passes fold into ``onednn.qconv2d_pointwise.binary`` with a ``sum`` post-op. oneDNN computes, in float32
steps on the exact int32 accumulator, ``t = fl(fl(acc x fl(s_in x s_w)) + b)``, then the sum post-op ``t = fl(t +
s_o x (o - zp_o))`` on the other input's codes ``o`` (read from its uint8 buffer, which the kernel overwrites with
its output), then ReLU, then ``rne(t x (1 / s_out)) + zp`` saturated to uint8. The fake-quant model computes the
float conv ``y = (x - zp) s_in * w s_w + b`` (float32, as the eager program does), ``fl(y + (o - zp_o) s_o)``, ReLU
and ``round(. / s_out)``. The layer has no quantizer of its own, so after calibration its weight scale goes on the
grid of the add's quantizer (:func:`targets.torch_quantized.exact_requant_grid`: ``s_in x s_w / s_out`` on multiples
of 2^-15, coarser where the conv output may reach past 2^9 output steps before the other input brings it back):
then ``acc x s_in x s_w``, ``+ b`` and ``+ s_o (o - zp_o)`` are all exact in float32 for every output in range, in
both, and both round the same value. Measured: 0 LSB compiled on torchvision's ResNet-18 and every test model
(BENCHMARKS.md); before the grid (weight scales free), 1 element in 32768 of ResNet-18's first stage differed by
1 LSB at a rounding tie, and 881 of 4096 outputs of the whole trunk by up to 0.156 (64 x 64 inputs).
"""
from __future__ import annotations

import numpy as np
import torch

F32_EXACT = 2 ** 24


def _odd_mantissa(x: np.ndarray) -> np.ndarray:
    frac, _ = np.frexp(x)
    mant = (frac * 2.0 ** 53).astype(np.int64)
    return mant // (mant & -mant)


def float32_sum_problems(s_in: float, s_w, s_out: float, worst) -> list[str]:
    """Where eager float32 sums of a layer's products may round: channels whose worst-case partial sum
    (``worst``: the largest ``|acc|`` any input codes give, per channel) times the odd mantissa of ``s_in x s_w``
    passes 2^24; [] when every partial sum of every input is exact. A note, not a refusal: int8 kernels accumulate
    in int32 and are exact regardless."""
    s = np.asarray(torch.as_tensor(s_w).reshape(-1).float(), dtype=np.float64) * s_in
    worst = np.asarray(torch.as_tensor(worst).reshape(-1), dtype=np.float64)
    mant = _odd_mantissa(np.broadcast_to(s, worst.shape).copy())
    over = worst * mant
    bad = np.flatnonzero(over >= F32_EXACT)
    if not bad.size:
        return []
    c = int(bad[np.argmax(over[bad])])
    steps = F32_EXACT / mant[c] * s[c] / s_out
    return [f"{bad.size} channel(s) can pass float32's exact sums eagerly (channel {c}: worst-case accumulator "
            f"{int(worst[c])} x mantissa {int(mant[c])}); exact while partial sums stay within {steps:.0f} output "
            "steps, as they do unless inputs come near the worst case"]
