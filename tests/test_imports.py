"""The import graph (read with ast, nothing imported): the core (quantfx/) never imports passes/ or targets/
(they register into the core's registries when ``import quantfx`` imports them last); no target imports the public
API (quantfx.export, quantfx.api, the quantfx package) or a pass; there is no import cycle; and every
function-local import is one of the listed few (optional dependencies, the CLI's lazy start-up), each with a
reason on its line."""
import ast
from pathlib import Path

import networkx as nx

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"quantfx": "quantfx", "passes": "quantfx.passes", "targets": "quantfx.targets"}
# the entry points, which import passes and targets: the package (quantfx/__init__ registers them in the core's
# registries) and the command line (an application on the package: --engine names the torch target's profiles)
ENTRY = {"quantfx", "quantfx.__main__", "quantfx.cli"}
# (module, imported module) of every function-local import: optional dependencies, modules slow to load that
# few calls need, and one import cycle of package initialisation (quant_tensor -> quant.functional, whose package
# imports quant.quantizer); each says why on its line or sits in a try/except ImportError
ALLOWED_LOCAL = {
    ("quantfx.calibration", "tqdm.auto"), ("quantfx.cli", "PIL"), ("quantfx.draw", "pygraphviz"),
    ("quantfx.mixed_precision", "scipy.optimize"), ("quantfx.model_specs", "timm"),
    ("quantfx.model_specs", "timm.data"), ("quantfx.model_specs", "huggingface_hub"),
    ("quantfx.model_specs", "torchvision"), ("quantfx.model_specs", "torchvision.transforms.functional"),
    ("quantfx.quant.quantizer", "torch.distributed"), ("quantfx.quant.quantizer", "quantfx.quant_tensor"),
    ("quantfx.passes.capture_export", "torch._dynamo.config"), ("quantfx.passes.capture_export", "torch._export.config"),
    ("quantfx.passes.share_quantizers", "networkx"), ("quantfx.targets.onnx_qdq", "onnxruntime"),
    ("quantfx.targets.finn_qonnx", "qonnx.core.modelwrapper"), ("quantfx.targets.finn_qonnx", "qonnx.core.onnx_exec"),
    ("quantfx.targets.finn_qonnx", "qonnx.transformation.change_batchsize"),
    ("quantfx.targets.finn_qonnx", "qonnx.transformation.infer_shapes"),
    ("quantfx.targets.finn_qonnx", "qonnx.util.cleanup"),
    ("quantfx.targets.finn_qonnx", "qonnx.transformation.general"),
    ("quantfx.targets.finn_qonnx", "qonnx.transformation.qonnx_to_qcdq"),
    ("quantfx.targets.finn_qonnx", "qonnx.custom_op.registry"),
    ("quantfx.targets.torch_pt2_runtime", "torch._inductor.cpu_vec_isa"),
}


def _modules() -> dict:
    """module name -> path, for every .py file of the three folders."""
    out = {}
    for folder, package in FOLDERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([package] + parts)] = path
    return out


def _imports(name: str, path: Path, modules: dict):
    """(imported project or third-party module, line, function-local) of every import in a module."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    local_nodes = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                   for n in ast.walk(f) if n is not f}
    guarded = {id(n) for t in ast.walk(tree) if isinstance(t, ast.Try) and any(
        isinstance(h.type, ast.Name) and h.type.id in ("ImportError", "ModuleNotFoundError") for h in t.handlers)
        for b in t.body for n in ast.walk(b)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node, id(node) in local_nodes, id(node) in guarded
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")
                parent = parent[:len(parent) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            for alias in node.names:
                full = f"{base}.{alias.name}"
                yield (full if full in modules else base), node, id(node) in local_nodes, id(node) in guarded


def _graph():
    modules = _modules()
    graph, local = nx.DiGraph(), []
    for name, path in modules.items():
        graph.add_node(name)
        for target, node, is_local, is_guarded in _imports(name, path, modules):
            if is_local:
                line = path.read_text().splitlines()[node.lineno - 1]
                local.append((name, target, is_guarded or "#" in line))
            if target in modules:
                graph.add_edge(name, target)
    return graph, local


GRAPH, LOCAL = _graph()


def _core(name: str) -> bool:
    return name.startswith("quantfx") and not name.startswith(("quantfx.passes", "quantfx.targets")) and \
        name not in ENTRY


def test_the_core_imports_no_pass_and_no_target():
    bad = [(a, b) for a, b in GRAPH.edges if _core(a) and b.startswith(("quantfx.passes", "quantfx.targets"))]
    assert bad == []


def test_targets_import_neither_the_public_api_nor_a_pass():
    api = ("quantfx", "quantfx.export", "quantfx.api")
    bad = [(a, b) for a, b in GRAPH.edges if a.startswith("quantfx.targets") and
           (b in api or b.startswith("quantfx.passes"))]
    assert bad == []


def test_passes_import_no_target():
    bad = [(a, b) for a, b in GRAPH.edges if a.startswith("quantfx.passes") and b.startswith("quantfx.targets")]
    assert bad == []


def test_no_import_cycle():
    cycles = list(nx.simple_cycles(GRAPH))
    assert cycles == []


def test_function_local_imports_are_the_listed_ones_with_a_reason():
    assert {(a, b) for a, b, _ in LOCAL} == ALLOWED_LOCAL
    assert [(a, b) for a, b, reason in LOCAL if not reason] == []


def test_the_graph_is_read():
    """The checks above see the real graph: the core, passes and targets are there, with their known edges."""
    assert GRAPH.has_edge("quantfx.passes.swap_modules", "quantfx.graph")
    assert GRAPH.has_edge("quantfx.targets.dpu.lowering", "quantfx.targets.onnx_qdq")
    assert GRAPH.has_edge("quantfx", "quantfx.targets")
    assert len(GRAPH) > 60
