"""dpu target: power-of-two XINT8 QDQ ONNX for AMD/Xilinx DPUs (the form AMD Quark's XINT8 flow writes and the
Vitis AI ONNX flow takes), with the DPU compiler's position rules applied and a DPU report.

The file: ``QuantizeLinear -> DequantizeLinear`` pairs with int8 zero point 0 and a power-of-two scale
``2**-fix_pos`` on every activation; int8 weights and int8 biases, each with its own power-of-two scale (the
bias's "internal" scale, as the DPU stores it, not the int32 input x weight scale of standard QDQ); plain Conv,
ConvTranspose and Gemm. Model metadata holds the fix position of every quantized tensor
(``quantfx.dpu.fix_positions``: int8 tensor name -> position) and the DPU report (``quantfx.dpu.report``: each
node on the DPU or the CPU with rule and limit, and the refine pass's changes).

Before anything is written, the lowering checks the profile's rules (8-bit, per-tensor, symmetric, power-of-two:
a 4-bit layer, per-channel weights or a zero point are a TargetError naming the node; the DPU compiler's position
rules, :func:`targets.dpu.positions.position_problems`). It changes nothing: calibration applied the position
rules (the recipe's pass ``refine_fix_positions``), so the fake-quant model and the file carry the same, DPU-legal
positions.

Rounding. Weights and biases are integers in the file (rounded half to even by quantfx's quantizers; XIR
rounds constants it quantizes itself with STD_ROUND, half away from zero, and vai_q_pytorch's DPU defaults,
``nndct_shared/quantization/quant_config.py`` ``_default_qconfig``, say "std_round" for weights and bias): the
DPU takes them as written. Activations are rounded by the DPU, with DPU_ROUND: ties up (Vitis AI's XIR/VART,
``dpu_round_float``: ``std::round`` for x >= 0, ``ceil`` on negative ties; the round mode XIR gives fix tensors
that are not constants; ``util::fix`` of ``src/vai_library/cpu_task/ops/common/util.hpp``, the CPU reference of
the DPU's ops, is the same; vai_q_pytorch's default for activations is "half_up"). The dpu profile's activation
quantizers round half up, so the fake-quant model computes what the DPU does. The file keeps standard
QuantizeLinear (ties to even), the form Quark and the Vitis AI ONNX flow read fix positions from;
:func:`dpu_round_form` is the same file with DPU rounding, which verification runs.

LeakyReLU. The DPU computes a LeakyReLU in the conv (or depthwise/transposed conv, or add) before it and rounds
once, at its output: ``y = DPU_ROUND(leaky(acc / 2^shift_cut))``, ``acc`` the integer sum with the bias shifted
in (``shift_bias >= 0``, see positions.py), slope 26/256. Sources: the CPU reference of XIR's conv2d-fix and
eltwise-fix (Vitis AI ``src/vai_library/cpu_task/ops/conv2d-fix/conv2d-fix.cpp``, ``eltwise-fix/eltwise-fix.cpp``:
``fix(nonlinear(sum / shift_cut_scale))``, one fix; its LEAKYRELU case multiplies by a placeholder 0.01);
vai_q_pytorch's ``nndct_shared/quantization/commander.py`` (SoftFuseLeakyRelu puts a LeakyReLU in its producer's
quantization group: no quantizer between them); amd-quark's ``quark/onnx/quantizers/interface.py``
(RemoveQDQConvLeakyRelu, default True, removes the QDQ between Conv and LeakyRelu). So the dpu profile quantizes
a LeakyReLU's output only (``quantfx.nn.QuantLeakyReLU``, whose layer or add is not requantized) and the file
holds ``Conv -> LeakyRelu -> QuantizeLinear``; in float32 that is exact while the sum times the slope's odd
numerator (13) stays below 2^24, which check_file checks. The DPU computes slope 26/256 only (vai_q_pytorch
``pytorch_nndct/hardware/dpu_op_filter.py``, filter_leaky_relu): another slope is rounded to 1/256 as Quark does
and the report places that LeakyReLU on the CPU.

Running it. onnxruntime fuses ``DQ -> Conv -> Q`` into u8 x s8 integer kernels where it can, and on x86 CPUs
without VNNI those sum products in saturating int16 pairs (``targets.int16_pairs``): an int8 activation (moved to
u8 by +128) times two 8-bit weights passes 32767. The verification form therefore disables QDQ fusion
(``session.disable_quant_qdq``) and rounds as the DPU (:func:`dpu_round_form`): every op runs in float32 on the
dequantized values, which is exact while every partial sum is an integer number of the layer's finest step below
2^24 (power-of-two scales make every product exact); :func:`targets.dpu.positions.check_file` checks that bound
per output channel, so the verified numbers do not depend on the CPU. :func:`fast_form` writes the onnxruntime-fast variant (int32 bias on the accumulator's
scale, so onnxruntime runs integer kernels): it rounds activation ties to even, and a LeakyReLU's layer output
once more before it (QLinearConv, QLinearLeakyRelu), so it approximates the DPU to an LSB or two (more where an
int16 pair sum saturates, on x86 without VNNI).
"""
from __future__ import annotations

import json
from typing import Optional

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper

from quantfx.errors import ExportError
from quantfx.graph import is_compute, module_of, qmeta
from quantfx.lowering import Backend, lower_with
from quantfx.nn import QuantLeakyReLU
from quantfx.quant_tensor import value_of

from ..int16_pairs import pair_risks
from ..onnx_base import feed, load_onnx, not_quantfx, save_onnx
from ..onnx_qdq import ort_session, run_onnx_intermediates
from ..onnx_steps import RequantizeMoves
from ..qdq import PlainQDQLowering
from .arch import DEFAULT_ARCH, DpuReport, get_arch
from .profile import DPU
from . import positions
from .positions import check_file, fix_pos, slope_odd_numerator
from .steps import (
    FIX_POSITIONS_KEY, FORM_KEY, REPORT_KEY, AccumulatorBiases, FixedPointActivations, InternalBiases,
    RequantizeBeforeLeaky, StampDpuReport, StampFixPositions, StampForm, UnsignedReluCodes,
)


class DpuLowering(PlainQDQLowering):
    """Plain QDQ with power-of-two int8 everywhere (the profile's quantizers) and the steps below. Conv /
    ConvTranspose / Gemm stay as the model has them (the DPU compiler maps these, not onnx's rewrites for
    onnxruntime's kernels), with no Clip guarding double Q/DQ pairs (verified with onnxruntime's QDQ transformers
    off: the file keeps Quark's form). ``form``: 'dpu' (the artefact) or 'fast' (for onnxruntime's integer
    kernels); ``arch``: the DPU the report places nodes for (a name of ``arch.ARCHS``)."""

    target = "dpu"

    def __init__(self, qmodel, example_inputs, profile=None, arch=DEFAULT_ARCH, form: str = "dpu"):
        super().__init__(qmodel, example_inputs, profile)
        if form not in ("dpu", "fast"):
            raise ExportError(f"dpu: form={form!r}; use 'dpu' or 'fast'")
        self.arch, self.form = get_arch(arch), form
        fast = form == "fast"
        self.steps = (
            FixedPointActivations(),  # LeakyReLU, ReLU6, an average pool's sum as the DPU computes them
            *([RequantizeBeforeLeaky()] if fast else []),  # onnxruntime's QLinearConv -> QLinearLeakyRelu
            RequantizeMoves(),  # a Q/DQ pair on the grid of every value that only moved
            *([UnsignedReluCodes()] if fast else []),  # ReLU outputs (and their moves) as uint8 codes
            *([AccumulatorBiases()] if fast else []),  # int32 biases on the accumulator's scale where exact
            InternalBiases(),  # int8 biases on their own power-of-two scale
            StampFixPositions(), StampDpuReport(), StampForm(),  # the file's metadata
        )


def _meta(model: onnx.ModelProto, key: str) -> Optional[str]:
    return next((p.value for p in model.metadata_props if p.key == key), None)


def report(model: onnx.ModelProto) -> DpuReport:
    """The DPU report stored in a dpu file: ``.table()``, ``.to_json()``, ``.nodes`` (Placement), ``.refine``."""
    text = _meta(model, REPORT_KEY)
    if text is None:
        raise ExportError("dpu: the model has no DPU report; lower it with quantfx.lower(qmodel, target='dpu')")
    return DpuReport.from_json(text)


def fix_positions(model: onnx.ModelProto) -> dict:
    """int8 tensor name -> fix position, as stored in a dpu file."""
    return json.loads(_meta(model, FIX_POSITIONS_KEY) or "{}")


def fast_form(qmodel, example_inputs) -> onnx.ModelProto:
    """The onnxruntime-fast form of the dpu file: int32 biases on the accumulator's scale and ReLU outputs as
    uint8, so onnxruntime fuses QLinearConv/QGemm integer kernels. Not exact: those kernels round activation ties
    to even (the DPU up), a layer before a LeakyReLU is requantized on its grid (the DPU rounds once), and on x86
    CPUs without VNNI a layer whose int16 pair sums can pass 32767 (``targets.int16_pairs.pair_risks``) may
    saturate. For speed measurements, not for verification."""
    return lower_with(lambda q, inputs: DpuLowering(q, inputs, profile=DPU, form="fast").lower(), qmodel,
                      example_inputs)


# -- runtime ---------------------------------------------------------------------------------------------


def dpu_round_form(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of a dpu file whose activations round as the DPU rounds them: every int8 ``QuantizeLinear(x, s,
    0)`` (ties to even) becomes ``Cast<int8>(Clip(Floor(x * (1/s) + 0.5), -128, 127))`` (ties up, DPU_ROUND),
    with the same output. ``1/s`` is a power of two, so ``x * (1/s)`` is exact, and so are ``+ 0.5`` and Floor
    for every value the Clip keeps."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in g.initializer}
    nodes, consts = [], []

    def const(name, value):
        consts.append(onnx.numpy_helper.from_array(np.asarray(value, np.float32), name))
        return name

    for n in g.node:
        zp = inits.get(n.input[2]) if n.op_type == "QuantizeLinear" and len(n.input) > 2 else None
        if zp is None or zp.dtype != np.int8 or np.any(zp != 0):
            nodes.append(n)
            continue
        b = n.name or n.output[0]
        inv = const(f"{b}_inv_scale", 1.0 / float(inits[n.input[1]]))
        lo, hi, half = const(f"{b}_qmin", -128.0), const(f"{b}_qmax", 127.0), const(f"{b}_half", 0.5)
        nodes += [helper.make_node("Mul", [n.input[0], inv], [f"{b}_scaled"], name=f"{b}_Mul"),
                  helper.make_node("Add", [f"{b}_scaled", half], [f"{b}_up"], name=f"{b}_Add"),
                  helper.make_node("Floor", [f"{b}_up"], [f"{b}_floor"], name=f"{b}_Floor"),
                  helper.make_node("Clip", [f"{b}_floor", lo, hi], [f"{b}_clip"], name=f"{b}_Clip"),
                  helper.make_node("Cast", [f"{b}_clip"], [n.output[0]], name=f"{b}_Cast", to=TensorProto.INT8)]
    del g.node[:]
    g.node.extend(nodes)
    g.initializer.extend(consts)
    return out


def dpu_session(model: onnx.ModelProto, threads: int = 1):
    """An onnxruntime session for a dpu file. The 'dpu' form runs as the verification form: activations rounded
    as the DPU rounds them (:func:`dpu_round_form`), QDQ fusion off, so every op runs in float32 on dequantized
    values, exact on every CPU under check_file's bound. The 'fast' form runs as written, on onnxruntime's
    integer kernels (ties to even)."""
    if _meta(model, FORM_KEY) == "fast":
        return ort_session(model, threads)
    return ort_session(dpu_round_form(model), threads, config={"session.disable_quant_qdq": "1"})


def run_dpu(model: onnx.ModelProto, inputs) -> list:
    return dpu_session(model).run(None, feed(model.graph.input, inputs))


def run_dpu_intermediates(model: onnx.ModelProto, inputs, fx_names) -> dict:
    return run_onnx_intermediates(model, inputs, fx_names, session=dpu_session)


def float_sum_risks(qmodel, inputs) -> list[tuple[str, int]]:
    """The layers whose float32 sums in the verification form could round on ``inputs``: for each conv/linear,
    the largest ``sum |x_code| |w_int| + |b_int|`` (in units of the layer's finest step) over its outputs, times
    the slope's odd numerator where a LeakyReLU reads the layer (13 for 26/256, as check_file counts), where
    it passes 2^24. An empty list means every partial sum, in any order, is an exact float32 integer of steps:
    the verified numbers are the same on every CPU for these inputs, whatever check_file's static bound says.
    Returns [(layer, worst)]."""
    nodes = {n.target: n for n in qmodel.graph.nodes if is_compute(qmodel, n)}
    worst: dict = {}

    def hook(name):
        def record(layer, args):
            node = nodes[name]
            meta = qmeta(node.args[0])
            if meta.kind != "act" or meta.scale is None or not layer.weight_quant.is_quant_enabled:
                return
            with torch.no_grad():
                x = value_of(args[0]).double().abs() / float(meta.scale)
                w_int, w_scale = DpuLowering.weight_ints(layer)
                acc_pos = fix_pos(meta.scale) + fix_pos(w_scale)
                unit_pos = acc_pos
                b = None
                if layer.bias is not None and layer.bias_quant.is_quant_enabled:
                    b_int, b_scale = DpuLowering.bias_ints(layer, meta.scale)
                    unit_pos = max(acc_pos, fix_pos(b_scale))
                    b = b_int.double().abs() * 2.0 ** (unit_pos - fix_pos(b_scale))
                sums = layer.inner_forward(x, w_int.double().abs(), b) if b is None else \
                    layer.inner_forward(x * 2.0 ** (unit_pos - acc_pos), w_int.double().abs(), b)
            # a LeakyReLU fused after the layer multiplies the sum by its slope in float32 (check_file's factor)
            (user,) = node.users if len(node.users) == 1 else (None,)
            leaky = module_of(qmodel, user) if user is not None and user.op == "call_module" else None
            factor = slope_odd_numerator(leaky.negative_slope) if isinstance(leaky, QuantLeakyReLU) else 1
            worst[name] = max(worst.get(name, 0), int(sums.max()) * factor)
        return record

    handles = [qmodel.get_submodule(t).register_forward_pre_hook(hook(t)) for t in nodes]
    was_training = qmodel.training
    qmodel.eval()
    try:
        with torch.no_grad():
            qmodel(*inputs)
    finally:
        qmodel.train(was_training)
        for h in handles:
            h.remove()
    return [(name, v) for name, v in worst.items() if v > positions.FLOAT_EXACT]  # read when called (tests lower it)


def diagnose(model: onnx.ModelProto, inputs) -> str:
    problems = check_file(model)
    if _meta(model, FORM_KEY) == "fast":
        risky = [r.node for r in pair_risks(model) if not r.safe]
        return ("the fast form runs onnxruntime's integer kernels, which round activation ties to even (the DPU "
                "and the fake-quant model round them up)" + (
                    f", and {len(risky)} layer(s) ({', '.join(risky[:3])}) can saturate an int16 pair sum on x86 "
                    "CPUs without VNNI" if risky else "") + "; verify the 'dpu' form for exact numbers")
    if problems:
        return ("the file breaks: " + "; ".join(problems[:3]) + " (float_sum_risks(qmodel, inputs) tells whether a "
                "float sum could round on these inputs)")
    return "the file meets every DPU rule and the float bound of the verification form"


def _lower(qmodel, example_inputs):
    return DpuLowering(qmodel, example_inputs, profile=DPU).lower()


BACKEND = Backend(
    name="dpu", lower=_lower, save=save_onnx, load=load_onnx, run=run_dpu,
    run_with_intermediates=run_dpu_intermediates, diagnose=diagnose, check=not_quantfx)

__all__ = ["DpuLowering", "BACKEND", "report", "fix_positions", "fast_form", "dpu_session", "run_dpu",
           "check_file", "dpu_round_form", "float_sum_risks"]
