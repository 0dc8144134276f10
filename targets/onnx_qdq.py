"""onnx target: standard ONNX in QDQ form, run by onnxruntime with int8 kernels.

Plain QDQ (:mod:`targets.qdq`): activations ``QuantizeLinear -> [Clip for < 8 bits] -> DequantizeLinear``
(uint8 with zero point or int8); weights int8 initializers feeding ``DequantizeLinear`` (per channel on the
output-channel axis); biases int32 initializers with scale = input scale x weight scale and zero point 0. Then
the steps :class:`QDQLowering` lists (:mod:`targets.onnx_steps`). onnxruntime fuses the DQ -> Conv/Gemm/Add/...
-> Q units into QLinear* integer kernels.
"""
from __future__ import annotations

from typing import Optional

import onnx

from quantfx.lowering import Backend

from .int16_pairs import INT16_MAX, check_layer, cpu_has_int32_dot, integer_layers, pair_risks
from .onnx_base import feed, load_onnx, node_values, not_quantfx, save_onnx, with_values
from .onnx_profile import ONNX
from .onnx_steps import GemmOverTokens, GuardDoubleQDQ, PixelShuffleTaps, RequantizeMoves, SpaceToDepthStem
from .qdq import PlainQDQLowering


class QDQLowering(PlainQDQLowering):
    """The onnx file: plain QDQ, and the steps that make onnxruntime run it in int8, with the model's integers."""

    target = "onnx"
    steps = (
        GuardDoubleQDQ(),     # a Clip between two Q/DQ pairs of different grids, where onnxruntime would merge them
        RequantizeMoves(),    # a Q/DQ pair on the grid of every value that only moved: complete QDQ units
        SpaceToDepthStem(),   # a strided stem over few channels as Pad -> SpaceToDepth -> Conv
        PixelShuffleTaps(),   # a ConvTranspose with kernel == stride as a 1x1 Conv -> Q/DQ -> DepthToSpace
        GemmOverTokens(),     # a Linear over tokens as Reshape -> Gemm -> Reshape (QGemm, the bias in the sum)
    )


# -- runtime ---------------------------------------------------------------------------------------------


def ort_session(model: onnx.ModelProto, threads: int = 1, optimize: bool = True, optimized_path=None,
                config: Optional[dict] = None):
    """An onnxruntime CPU session; ``config``: session config entries (e.g. {"session.disable_quant_qdq": "1"})."""
    import onnxruntime as ort  # loads slowly; only running an artefact needs it
    opts = ort.SessionOptions()
    for key, value in (config or {}).items():
        opts.add_session_config_entry(key, value)
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else \
        ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if optimized_path is not None:
        opts.optimized_model_filepath = str(optimized_path)
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def run_onnx(model: onnx.ModelProto, inputs) -> list:
    return ort_session(model).run(None, feed(model.graph.input, inputs))


def with_outputs(model: onnx.ModelProto, fx_names) -> tuple[onnx.ModelProto, list]:
    """A copy of ``model`` that also outputs the values of the given fx nodes; (model, fx names kept)."""
    mapping = node_values(model)
    kept = [n for n in fx_names if n in mapping]
    return with_values(model, [mapping[n] for n in kept]), kept


def run_onnx_intermediates(model, inputs, fx_names, session=ort_session) -> dict:
    extended, kept = with_outputs(model, fx_names)
    mapping = node_values(model)
    sess = session(extended)
    names = [o.name for o in sess.get_outputs()]
    values = dict(zip(names, sess.run(None, feed(extended.graph.input, inputs))))
    return {n: values[mapping[n]] for n in kept if mapping[n] in values}


def _lower(qmodel, example_inputs):
    return QDQLowering(qmodel, example_inputs, profile=ONNX).lower()


def layer_checks(model: onnx.ModelProto, inputs) -> list:
    """Each u8 x s8 layer of ``model`` on ``inputs``: its accumulators as CPUs with int32 dot products (VNNI x86,
    ARM) compute them against an emulation of AVX2's saturating int16 pair sums (int16_pairs.check_layer), the
    integer inputs taken from onnxruntime."""
    layers = integer_layers(model)
    extended = with_values(model, [layer.codes for layer in layers])
    sess = ort_session(extended, optimize=False)  # the codes are the Q outputs, whichever kernels run after them
    values = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feed(extended.graph.input, inputs))))
    return [check_layer(layer, values[layer.codes]) for layer in layers]


def diagnose(model: onnx.ModelProto, inputs) -> str:
    """Whether a mismatch of ``model`` in onnxruntime on ``inputs`` is consistent with int16 pair saturation."""
    fix = "quantize with cpu='any' (the default: 7-bit weights) for a file that is exact on every CPU"
    risky = [r for r in pair_risks(model) if not r.safe]
    if not risky:
        return (f"no integer layer of the file can pass {INT16_MAX} in an int16 pair sum of onnxruntime's u8 x s8 "
                "kernels, so CPU differences (VNNI or not) are not the cause")
    hit = [c for c in layer_checks(model, inputs) if not c.exact]
    has_dot = cpu_has_int32_dot()
    if not hit:
        return (f"not int16 pair saturation: {len(risky)} integer layer(s) could saturate on x86 CPUs without "
                "VNNI, but none does on these inputs (emulated)")
    names = ", ".join(f"{c.node} ({c.differing} of {c.outputs} accumulators, up to {c.max_diff} off)"
                      for c in hit[:3]) + (", ..." if len(hit) > 3 else "")
    where = {False: "this CPU has no VNNI, so it sums u8 x s8 products in saturating int16 pairs",
             True: "this CPU has VNNI (or is ARM), so the file is exact here but not on x86 CPUs without VNNI",
             None: "this CPU's kernels are unknown"}[has_dot]
    return (f"{'consistent with' if has_dot is not True else 'not the cause here, but note'} int16 pair "
            f"saturation: on these inputs, emulated AVX2 arithmetic changes {len(hit)} layer(s): {names}; "
            f"{where}; {fix}")


BACKEND = Backend(
    name="onnx", lower=_lower, save=save_onnx, load=load_onnx, run=run_onnx,
    run_with_intermediates=run_onnx_intermediates, diagnose=diagnose, check=not_quantfx)
