"""Put quantfx's finn artefacts through FINN's own frontend and check that nothing changes.

For every test model (or the .onnx files given): quantize for finn, export, then run FINN's first build
steps on the file: qonnx ``cleanup_model`` -> ``ConvertQONNXtoFINN`` (Quant -> MultiThreshold, weights
folded) -> tidy-up (shapes, constants, names, datatypes) -> ``Streamline``; ``--lower`` adds
``LowerConvsToMatMul`` and a second streamline, as FINN's step_streamline does. After each stage qonnx executes
the model on the same input and the output is compared with the exported file's (0 = identical). Prints the
ops left after streamlining and which compute layers still read float inputs.

FINN is not on PyPI: put its sources on the path, e.g. ``git clone https://github.com/Xilinx/finn`` and
``PYTHONPATH=finn/src python tools/finn_frontend.py``. FINN pins an older qonnx than quantfx's 1.0.0; two of
its call sites need the shim this script installs (``execute_node`` without ``opset_version``, a numpy
scalar given to ``set_nodeattr``); ``--no-shim`` runs FINN unpatched.

    PYTHONPATH=/path/to/finn/src python tools/finn_frontend.py [--lower] [--models unet,resnet] [file.onnx ...]
"""
from __future__ import annotations

import argparse
import collections
import inspect
import sys
import tempfile
from pathlib import Path

import numpy as np


def _install_shim() -> None:
    """Make FINN's calls that predate qonnx 1.0.0 work with it (no change to what they compute)."""
    import qonnx.core.onnx_exec as oxe
    from qonnx.custom_op.base import CustomOp
    execute_node = oxe.execute_node
    if inspect.signature(execute_node).parameters["opset_version"].default is inspect.Parameter.empty:
        def execute_node_default_opset(node, context, graph, opset_version=None, *args, **kwargs):
            if opset_version is None:
                opset_version = 13 if node.domain in ("", "ai.onnx") else 1
            return execute_node(node, context, graph, opset_version, *args, **kwargs)
        oxe.execute_node = execute_node_default_opset  # before finn's modules bind the name
    set_nodeattr = CustomOp.set_nodeattr

    def set_nodeattr_python_scalars(self, name, value, *args, **kwargs):
        return set_nodeattr(self, name, value.item() if isinstance(value, np.generic) else value, *args, **kwargs)
    CustomOp.set_nodeattr = set_nodeattr_python_scalars


def _stages(lower: bool):
    from qonnx.transformation.fold_constants import FoldConstants
    from qonnx.transformation.general import GiveReadableTensorNames, GiveUniqueNodeNames, RemoveStaticGraphInputs
    from qonnx.transformation.infer_datatypes import InferDataTypes
    from qonnx.transformation.infer_shapes import InferShapes
    from qonnx.util.cleanup import cleanup_model

    import finn.transformation.streamline.absorb as absorb
    from finn.transformation.qonnx.convert_qonnx_to_finn import ConvertQONNXtoFINN
    from finn.transformation.streamline import Streamline

    def tidy(m):
        for t in (InferShapes(), FoldConstants(), GiveUniqueNodeNames(), GiveReadableTensorNames(),
                  InferDataTypes(), RemoveStaticGraphInputs()):
            m = m.transform(t)
        return m

    stages = [("cleanup", cleanup_model), ("ConvertQONNXtoFINN", lambda m: tidy(m.transform(ConvertQONNXtoFINN()))),
              ("Streamline", lambda m: m.transform(absorb.AbsorbSignBiasIntoMultiThreshold()).transform(Streamline()))]
    if lower:
        from qonnx.transformation.lower_convs_to_matmul import LowerConvsToMatMul
        from finn.transformation.streamline.reorder import MakeMaxPoolNHWC

        def lowered(m):
            for t in (LowerConvsToMatMul(), MakeMaxPoolNHWC(), absorb.AbsorbTransposeIntoMultiThreshold(),
                      MakeMaxPoolNHWC(), absorb.AbsorbConsecutiveTransposes(), Streamline()):
                m = m.transform(t)
            return m
        stages.append(("lower + Streamline", lowered))
    return stages


def _float_inputs(model) -> list:
    """Compute layers whose data input has no integer datatype after streamlining."""
    from qonnx.core.datatype import DataType
    return [n.name for n in model.graph.node if n.op_type in ("Conv", "ConvTranspose", "MatMul")
            and model.get_tensor_datatype(n.input[0]) in (None, DataType["FLOAT32"])]


def check(path: Path, lower: bool, seed: int = 0) -> dict:
    """{'ok', 'stage' (where it failed), 'error', 'max_diff', 'ops', 'float_inputs'} for one QONNX file."""
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.core.onnx_exec import execute_onnx
    model = ModelWrapper(str(path))
    inp = model.graph.input[0]
    shape = model.get_tensor_shape(inp.name)
    x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    reference, result = None, {"ok": True, "max_diff": 0.0}
    for name, stage in _stages(lower):
        try:
            model = stage(model)
            out = execute_onnx(model, {model.graph.input[0].name: x})[model.graph.output[0].name]
        except Exception as e:  # FINN's frontend refusing (or breaking) the file is the finding
            return {"ok": False, "stage": name, "error": f"{type(e).__name__}: {e}"}
        reference = out if reference is None else reference
        result["max_diff"] = max(result["max_diff"], float(np.max(np.abs(out - reference))))
    result["ok"] = result["max_diff"] == 0.0
    result["ops"] = dict(collections.Counter(n.op_type for n in model.graph.node))
    result["float_inputs"] = _float_inputs(model)
    return result


def _zoo_files(models, directory: Path) -> list:
    import torch

    import quantfx
    from quantfx.zoo import TEST_MODELS, example_input
    files = []
    for name in models or TEST_MODELS:
        torch.manual_seed(0)
        data = [example_input(name, batch=4, seed=i) for i in range(4)]
        q = quantfx.quantize(TEST_MODELS[name][0]().eval(), "finn", calibration_data=data, progress=False)
        files.append(directory / f"{name}.onnx")
        quantfx.export(q, files[-1], example_inputs=(example_input(name, batch=1),))
    return files


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="*", type=Path, help="QONNX files (default: every test model, exported)")
    parser.add_argument("--models", help="comma-separated test models (default: all)")
    parser.add_argument("--lower", action="store_true", help="also LowerConvsToMatMul + Streamline")
    parser.add_argument("--no-shim", action="store_true", help="run FINN without the qonnx 1.0.0 shim")
    args = parser.parse_args(argv)
    if not args.no_shim:
        _install_shim()
    try:
        import finn.transformation.qonnx.convert_qonnx_to_finn  # noqa: F401
    except ImportError as e:
        sys.exit(f"FINN is not importable ({e}); put FINN's src/ on PYTHONPATH (see --help)")
    with tempfile.TemporaryDirectory() as tmp:
        files = args.files or _zoo_files(args.models.split(",") if args.models else None, Path(tmp))
        results = {}
        for path in files:
            r = results[path.stem] = check(path, args.lower)
            if "error" in r:
                print(f"{path.stem:12s} FAILED in {r['stage']}: {r['error']}")
            else:
                print(f"{path.stem:12s} {'OK' if r['ok'] else 'DIFFERS'}  max diff {r['max_diff']:g}  "
                      f"float inputs: {', '.join(r['float_inputs']) or 'none'}  ops: {r['ops']}")
    print(f"{sum(r['ok'] for r in results.values())}/{len(results)} through FINN's frontend unchanged")
    return results


if __name__ == "__main__":
    main()
