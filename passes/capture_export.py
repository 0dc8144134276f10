"""Capture by ``torch.export``: export a model on its example inputs and lift the exported aten graph to the
torch-level graph symbolic tracing gives (``F.conv2d``, ``F.linear``, ``operator.add``, ``x.view(...)``, ...).

Used by the trace pass (``capture='export'`` or ``'auto'`` when torch.fx cannot trace). What comes out is a
plain ``fx.GraphModule`` whose parameters, buffers and constants are ``get_attr`` nodes of the fully qualified
names they have in the user's model (the exported program's graph signature); every lifted node keeps the
export's ``nn_module_stack``, from which passes/raise_modules.py names the modules it raises. Nodes that do not
depend on the inputs (position ids, masks built from ``arange`` at the example's sizes) are folded into buffers.
"""
from __future__ import annotations

import contextlib
import operator
import warnings

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.export import Dim
from torch.export.graph_signature import InputKind
from torch.utils import _pytree as pytree

from quantfx.errors import TraceError

aten = torch.ops.aten

#: node.meta entries kept from the exported graph (module paths, source functions, shapes)
_KEEP_META = ("nn_module_stack", "source_fn_stack", "stack_trace", "val")


def capture_program(model: nn.Module, example_inputs: tuple) -> tuple[fx.GraphModule, str]:
    """``torch.export.export(model, example_inputs, strict=False)`` lifted by :func:`lift_program`, with the batch
    (first) dimension of every tensor input left to export (``Dim.AUTO``: dynamic where the model allows, static
    where it specialises). Captured again with static shapes when export fails with a dynamic batch, or when the
    batch size reaches computations no target lowers (GPT-2 builds its mask from position ids expanded to the
    batch: with static shapes they fold to a constant). Returns (GraphModule, how the shapes were kept).
    Raises TraceError."""
    tensors = [x for x in example_inputs if torch.is_tensor(x)]
    dynamic = tuple({0: Dim.AUTO} if torch.is_tensor(x) and x.dim() > 0 else None for x in example_inputs)
    errors = []
    for shapes in ((dynamic if tensors else None), None):
        try:
            with _export_state_kept():
                ep = torch.export.export(model, tuple(example_inputs), dynamic_shapes=shapes, strict=False)
        except Exception as e:  # noqa: BLE001  (export raises many types; each is reported)
            errors.append(f"export with a dynamic batch failed: {type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''}")
            continue
        gm = lift_program(ep, type(model).__name__)
        if shapes is not None and _batch_is_dynamic(ep):
            sized = _computed_from_sizes(gm)
            if sized is None:
                return gm, "batch dimension dynamic"
            errors.append(f"the batch size reaches {sized}, which would stay in the graph")
            continue
        return gm, "shapes static (" + (errors[0] if errors else "the model specialises on the batch size") + ")"
    raise TraceError(f"trace: torch.export cannot capture {type(model).__name__} either ({errors[-1]}). "
                     "Give example_inputs the model runs on, or mark the failing submodule a leaf with "
                     "capture='fx' and leaf_modules=[...]")


def _computed_from_sizes(gm: fx.GraphModule):
    """'<node> (<op>)' of the first aten op left unlifted that depends on the inputs' sizes only, not on their
    values (masks and index tensors built for the batch), or None."""
    from_sizes: set = set()
    for node in gm.graph.nodes:
        if node.op == "call_method" and node.target == "size":
            from_sizes.add(node)
        elif node.op in ("call_function", "call_method") and all(
                a in from_sizes or a.op == "get_attr" for a in node.all_input_nodes) and \
                any(a in from_sizes for a in node.all_input_nodes):
            from_sizes.add(node)
            if isinstance(node.target, torch._ops.OpOverload):
                return f"{node.name} ({node.target})"
    return None


def _batch_is_dynamic(ep) -> bool:
    for node in ep.graph.nodes:
        if node.op == "placeholder" and isinstance(node.meta.get("val"), torch.Tensor):
            shape = node.meta["val"].shape
            if len(shape) and not isinstance(shape[0], int):
                return True
    return False


@contextlib.contextmanager
def _export_state_kept():
    """torch.export changes no global state we rely on; this restores the dynamo/export configs it reads anyway,
    so a capture leaves the process as it found it (tests/test_capture.py checks)."""
    import torch._dynamo.config as dynamo_config  # private modules, loaded only by a capture with export
    import torch._export.config as export_config  # the same
    with warnings.catch_warnings():  # reading a config also reads its deprecated keys
        warnings.simplefilter("ignore")
        saved = [(cfg, cfg.get_config_copy()) for cfg in (dynamo_config, export_config)]
    try:
        yield
    finally:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for cfg, state in saved:
                for key, value in state.items():
                    if getattr(cfg, key) != value:
                        setattr(cfg, key, value)


# -- aten -> torch-level calls ------------------------------------------------------------------------------
# Each entry: aten overload -> function (args, kwargs) -> (op, target, args, kwargs) in the torch-level form
# symbolic tracing of ordinary model code records. Ops missing here stay aten calls: the graph still runs, and
# a target that cannot lower one says so naming the node.

def _fn(target, arity=None):
    def lift(args, kwargs):
        return "call_function", target, tuple(args if arity is None else args[:arity]), dict(kwargs)
    return lift


def _method(name):
    def lift(args, kwargs):
        return "call_method", name, tuple(args), dict(kwargs)
    return lift


def _binary(target):
    def lift(args, kwargs):
        if kwargs.get("alpha", 1) != 1:
            return None
        return "call_function", target, tuple(args[:2]), {}
    return lift


def _conv(args, kwargs):
    x, w, b, stride, padding, dilation, transposed, output_padding, groups = args
    n = len(stride)
    if transposed:
        return "call_function", (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[n - 1], \
            (x, w, b, stride, padding, output_padding, groups, dilation), {}
    return "call_function", (F.conv1d, F.conv2d, F.conv3d)[n - 1], (x, w, b, stride, padding, dilation, groups), {}


def _batch_norm(args, kwargs):  # aten.batch_norm(x, w, b, mean, var, training, momentum, eps, cudnn)
    x, w, b, mean, var, training, momentum, eps = args[:8]
    return "call_function", F.batch_norm, (x, mean, var, w, b, training, momentum, eps), {}


def _batch_norm_no_training(args, kwargs):  # (x, w, b, mean, var, momentum, eps) -> (out, save_mean, save_rstd)
    x, w, b, mean, var, momentum, eps = args
    return "call_function", F.batch_norm, (x, mean, var, w, b, False, momentum, eps), {}


def _slice(args, kwargs):  # aten.slice(x, dim=0, start=None, end=None, step=1)
    x, dim, start, end, step = list(args) + [0, None, None, 1][len(args) - 1:]
    if isinstance(end, int) and end >= 2 ** 62:  # "to the end"
        end = None
    index = (slice(None),) * dim + (slice(start or None, end, None if step == 1 else step),)
    return "call_function", operator.getitem, (x, index), {}


def _select(args, kwargs):
    x, dim, i = args
    return "call_function", operator.getitem, (x, (slice(None),) * dim + (i,)), {}


def _identity(args, kwargs):
    return "identity", None, (args[0],), {}


def _to(args, kwargs):
    x = args[0]
    dtype = kwargs.get("dtype", args[1] if len(args) > 1 and isinstance(args[1], torch.dtype) else None)
    val = x.meta.get("val") if isinstance(x, fx.Node) else None
    if dtype is None or (isinstance(val, torch.Tensor) and val.dtype == dtype):
        return "identity", None, (x,), {}
    return "call_method", "to", (x, dtype), {}


def _softmax(args, kwargs):
    return "call_function", F.softmax, (args[0],), {"dim": args[1]}


def _embedding(args, kwargs):  # aten.embedding(weight, indices, padding_idx, ...)
    return "call_function", F.embedding, (args[1], args[0]), {}


def _gelu(args, kwargs):
    approximate = kwargs.get("approximate", args[1] if len(args) > 1 else "none")
    return "call_function", F.gelu, (args[0],), ({"approximate": approximate} if approximate != "none" else {})


def _pad(args, kwargs):
    value = args[2] if len(args) > 2 else kwargs.get("value", 0.0)
    return "call_function", F.pad, (args[0], list(args[1])), ({"value": value} if value else {})


def _pad_mode(args, kwargs):  # aten.pad(x, pad, mode='constant', value=None)
    mode = args[2] if len(args) > 2 else kwargs.get("mode", "constant")
    value = args[3] if len(args) > 3 else kwargs.get("value")
    return "call_function", F.pad, (args[0], list(args[1])), {
        k: v for k, v in (("mode", mode), ("value", value)) if v not in (None, 0.0, "constant")}


def _adaptive_avg_pool1d(args, kwargs):  # to one value per row: a mean over the last axis (Swin's pooler)
    if list(args[1]) != [1]:
        return None
    return "call_function", torch.mean, (args[0], [-1]), {"keepdim": True}


def _mean(args, kwargs):
    keepdim = args[2] if len(args) > 2 else kwargs.get("keepdim", False)
    return "call_function", torch.mean, (args[0], list(args[1])), ({"keepdim": True} if keepdim else {})


def _unflatten(args, kwargs):  # aten.unflatten.int(x, dim, sizes) as x.reshape(...): one dynamic size as -1
    x, dim, sizes = args[:3]
    val = x.meta.get("val") if isinstance(x, fx.Node) else None
    if not isinstance(val, torch.Tensor) or any(not isinstance(s, int) or s < 0 for s in sizes):
        return None
    shape = list(val.shape)
    dim = dim % len(shape)
    shape[dim:dim + 1] = list(sizes)
    dynamic = [i for i, s in enumerate(shape) if not isinstance(s, int)]
    if len(dynamic) > 1:
        return None
    return "call_method", "reshape", (x, [-1 if i in dynamic else int(s) for i, s in enumerate(shape)]), {}


def _sum(args, kwargs):  # aten.sum.dim_IntList(x, dims, keepdim=False, dtype=None)
    keepdim = args[2] if len(args) > 2 else kwargs.get("keepdim", False)
    if kwargs.get("dtype") is not None or len(args) > 3:
        return None
    return "call_function", torch.sum, (args[0], list(args[1])), ({"keepdim": True} if keepdim else {})


def _sdpa(args, kwargs):
    names = ("attn_mask", "dropout_p", "is_causal")
    kw = {k: v for k, v in zip(names, args[3:])}
    kw.update(kwargs)
    kw = {k: v for k, v in kw.items() if not (k == "attn_mask" and v is None) and
          not (k == "dropout_p" and v == 0.0) and not (k == "is_causal" and v is False) and
          not (k == "enable_gqa" and v is False)}
    return "call_function", F.scaled_dot_product_attention, tuple(args[:3]), kw


def _squeeze(args, kwargs):
    return "call_function", torch.squeeze, tuple(args[:1]) + ((args[1],) if len(args) > 1 else ()), {}


def _split(args, kwargs):
    return "call_function", torch.split, (args[0], args[1]) + ((args[2],) if len(args) > 2 else ()), {}


def _addmm(args, kwargs):  # aten.addmm(bias, x, w): x @ w + bias (GPT-2's Conv1D)
    if kwargs.get("beta", 1) != 1 or kwargs.get("alpha", 1) != 1:
        return None
    return "call_function", torch.addmm, tuple(args[:3]), {}


def _hardtanh(args, kwargs):
    lo, hi = (list(args[1:3]) + [-1.0, 1.0][len(args) - 1:])[:2]
    if (lo, hi) == (0.0, 6.0):
        return "call_function", F.relu6, (args[0],), {}
    return "call_function", F.hardtanh, (args[0], lo, hi), {}


def _pool(target, n):
    def lift(args, kwargs):
        return "call_function", target, tuple(args[:n]), {}
    return lift


def _avg_pool2d(args, kwargs):  # (x, kernel, stride, padding, ceil_mode, count_include_pad, divisor_override)
    full = list(args) + [None] * (7 - len(args))
    x, kernel, stride, padding, ceil_mode, count_include_pad, divisor = full
    kw = {}
    if ceil_mode:
        kw["ceil_mode"] = True
    if count_include_pad is False:
        kw["count_include_pad"] = False
    if divisor is not None:
        kw["divisor_override"] = divisor
    return "call_function", F.avg_pool2d, (x, kernel, stride or kernel, padding or 0), kw


def _max_pool_indices(args, kwargs):
    return "tuple", F.max_pool2d, tuple(args), {}


LIFT = {
    aten.conv1d.default: _fn(F.conv1d), aten.conv2d.default: _fn(F.conv2d), aten.conv3d.default: _fn(F.conv3d),
    aten.conv1d.padding: _fn(F.conv1d), aten.conv2d.padding: _fn(F.conv2d), aten.conv3d.padding: _fn(F.conv3d),
    aten.conv_transpose1d.default: _fn(F.conv_transpose1d), aten.conv_transpose2d.input: _fn(F.conv_transpose2d),
    aten.conv_transpose3d.input: _fn(F.conv_transpose3d), aten.convolution.default: _conv,
    aten.linear.default: _fn(F.linear), aten.addmm.default: _addmm,
    aten.batch_norm.default: _batch_norm,
    aten._native_batch_norm_legit_no_training.default: _batch_norm_no_training,
    aten.layer_norm.default: _fn(F.layer_norm, 5), aten.group_norm.default: _fn(F.group_norm, 5),
    aten.relu.default: _fn(F.relu), aten.relu_.default: _fn(F.relu), aten.relu6.default: _fn(F.relu6),
    aten.hardtanh.default: _hardtanh, aten.hardtanh_.default: _hardtanh,
    aten.sigmoid.default: _fn(torch.sigmoid), aten.tanh.default: _fn(torch.tanh), aten.gelu.default: _gelu,
    aten.silu.default: _fn(F.silu), aten.silu_.default: _fn(F.silu), aten.hardswish.default: _fn(F.hardswish),
    aten.hardswish_.default: _fn(F.hardswish), aten.hardsigmoid.default: _fn(F.hardsigmoid),
    aten.hardsigmoid_.default: _fn(F.hardsigmoid), aten.mish.default: _fn(F.mish),
    aten.leaky_relu.default: _fn(F.leaky_relu), aten.elu.default: _fn(F.elu, 2), aten.prelu.default: _fn(F.prelu),
    aten.add.Tensor: _binary(operator.add), aten.sub.Tensor: _binary(operator.sub),
    aten.mul.Tensor: _binary(operator.mul), aten.div.Tensor: _binary(operator.truediv),
    aten.add.Scalar: _binary(operator.add), aten.mul.Scalar: _binary(operator.mul),
    # in place (hidden += residual): lifted out of place, later reads of the operand read the result
    aten.add_.Tensor: _binary(operator.add), aten.sub_.Tensor: _binary(operator.sub),
    aten.mul_.Tensor: _binary(operator.mul), aten.div_.Tensor: _binary(operator.truediv),
    aten.matmul.default: _fn(torch.matmul), aten.bmm.default: _fn(torch.bmm), aten.mm.default: _fn(torch.matmul),
    aten.cat.default: _fn(torch.cat), aten.stack.default: _fn(torch.stack),
    # view as reshape: the clone() that made its input contiguous is dropped as an identity
    aten.view.default: _method("reshape"), aten._unsafe_view.default: _method("reshape"),
    aten.reshape.default: _method("reshape"), aten.flatten.using_ints: _fn(torch.flatten),
    aten.unflatten.int: _unflatten,
    aten.permute.default: _fn(torch.permute), aten.transpose.int: _fn(torch.transpose), aten.t.default: _fn(torch.t),
    aten.unsqueeze.default: _fn(torch.unsqueeze), aten.squeeze.dim: _squeeze, aten.squeeze.dims: _squeeze,
    aten.squeeze.default: _squeeze, aten.expand.default: _method("expand"),
    aten.split.Tensor: _split, aten.split_with_sizes.default: _split, aten.chunk.default: _fn(torch.chunk),
    aten.slice.Tensor: _slice, aten.select.int: _select,
    aten.mean.dim: _mean, aten.sum.dim_IntList: _sum, aten.adaptive_avg_pool2d.default: _fn(F.adaptive_avg_pool2d),
    aten.avg_pool2d.default: _avg_pool2d, aten.max_pool2d.default: _pool(F.max_pool2d, 6),
    aten.max_pool2d_with_indices.default: _max_pool_indices,
    aten.softmax.int: _softmax, aten._softmax.default: _softmax,
    aten.scaled_dot_product_attention.default: _sdpa, aten.embedding.default: _embedding,
    aten.adaptive_avg_pool1d.default: _adaptive_avg_pool1d, aten.constant_pad_nd.default: _pad, aten.pad.default: _pad_mode, aten.pixel_shuffle.default: _fn(F.pixel_shuffle),
    aten.dropout.default: _identity, aten.feature_dropout.default: _identity, aten.alpha_dropout.default: _identity,
    aten.clone.default: _identity, aten.contiguous.default: _identity, aten.alias.default: _identity,
    aten.detach.default: _identity, aten.detach_.default: _identity, aten.lift_fresh_copy.default: _identity,
    aten.to.dtype: _to, aten.to.dtype_layout: _to, aten._to_copy.default: _to,
    aten.unbind.int: _fn(torch.unbind),
    aten.pow.Tensor_Scalar: _fn(torch.pow), aten.rsqrt.default: _fn(torch.rsqrt), aten.sqrt.default: _fn(torch.sqrt),
    aten.exp.default: _fn(torch.exp), aten.neg.default: _fn(operator.neg),
    aten.sym_size.int: lambda args, kwargs: ("call_method", "size", tuple(args), {}),
}

#: asserts and checks of the exported program with no value in an inference graph
_DROP = {aten._assert_tensor_metadata.default, aten._assert_scalar.default, aten.sym_constrain_range_for_size.default}


def lift_program(ep, class_name: str = "ExportedModel") -> fx.GraphModule:
    """The torch-level GraphModule of an ExportedProgram: parameters, buffers and constants read by ``get_attr``
    of their names in the user's module, aten calls lifted by :data:`LIFT`, input-independent nodes folded."""
    sig = ep.graph_signature
    kinds = {spec.arg.name: spec for spec in sig.input_specs if hasattr(spec.arg, "name")}
    state = dict(ep.state_dict)
    state.update(ep.constants)
    root = nn.Module()
    graph = fx.Graph()
    env: dict = {}
    for node in ep.graph.nodes:
        if node.op == "placeholder":
            spec = kinds.get(node.name)
            if spec is not None and spec.kind in (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR):
                _install(root, spec.target, state[spec.target], spec.kind is InputKind.PARAMETER)
                new = graph.get_attr(spec.target)
            elif spec is not None and spec.kind is InputKind.USER_INPUT:
                new = graph.placeholder(node.name)
            else:
                raise TraceError(f"trace: the exported program of {class_name} has an input {node.name} of kind "
                                 f"{spec.kind.name if spec else 'unknown'} that quantfx cannot bind; use capture='fx'")
            _keep_meta(node, new)
            env[node] = new
        elif node.op == "output":
            outs = [env[a] if isinstance(a, fx.Node) else a for a in node.args[0]]
            graph.output(pytree.tree_unflatten(outs, ep.call_spec.out_spec) if ep.call_spec.out_spec else outs[0])
        elif node.op == "call_function":
            if node.target in _DROP:
                continue
            env[node] = _lift_node(graph, node, env)
            if isinstance(node.target, torch._ops.OpOverload) and node.target._schema.name.endswith("_") and \
                    node.args and isinstance(node.args[0], fx.Node):
                env[node.args[0]] = env[node]  # an op in place: its operand now holds the result
    gm = fx.GraphModule(root, graph, class_name)
    _fold_constants(gm)
    _drop_empty_cat_members(gm)
    return gm


def _lift_node(graph: fx.Graph, node: fx.Node, env: dict):
    if node.target is operator.getitem and isinstance(env[node.args[0]], _First):
        if node.args[1] != 0:
            raise TraceError(f"trace: node {node.name} reads output {node.args[1]} of {node.args[0].name} "
                             f"({node.args[0].target}), which quantfx does not lift; use capture='fx'")
        return env[node.args[0]].node
    args = pytree.tree_map_only(fx.Node, lambda a: env[a], node.args)
    kwargs = pytree.tree_map_only(fx.Node, lambda a: env[a], dict(node.kwargs))
    lifted = LIFT.get(node.target)
    form = lifted(args, kwargs) if lifted is not None else None
    if form is None:
        new = graph.call_function(node.target, args, kwargs)
    else:
        op, target, a, kw = form
        if op == "identity":
            return a[0]
        if op == "tuple":  # an op of several outputs lifted to the torch call that returns the first one
            new = graph.call_function(target, a, kw)
            _keep_meta(node, new)
            return _First(new)
        new = graph.create_node(op, target, a, kw)
    _keep_meta(node, new)
    if node.target is aten._native_batch_norm_legit_no_training.default:
        return _First(new)
    return new


class _First:
    """Stands for a tuple-valued aten node lifted to a call that returns the tuple's first element only."""

    def __init__(self, node):
        self.node = node


def _keep_meta(src: fx.Node, dst: fx.Node) -> None:
    for key in _KEEP_META:
        if key in src.meta:
            dst.meta[key] = src.meta[key]


def _install(root: nn.Module, target: str, value, is_param: bool) -> None:
    owner = root
    *path, name = target.split(".")
    for part in path:
        child = getattr(owner, part, None)
        if child is None:
            child = nn.Module()
            owner.add_module(part, child)
        owner = child
    if is_param:
        owner.register_parameter(name, value if isinstance(value, nn.Parameter) else nn.Parameter(value, False))
    elif torch.is_tensor(value):
        owner.register_buffer(name, value)
    else:
        setattr(owner, name, value)


def _fold_constants(gm: fx.GraphModule) -> None:
    """Replace nodes computed from constants only (no input reaches them) by buffers ``_folded.<node>``: the
    position ids, masks and index tensors a model builds at the example's sizes."""
    graph = gm.graph
    constant: set = set()
    values: dict = {}
    for node in graph.nodes:
        if node.op == "get_attr":
            constant.add(node)
            continue
        if node.op not in ("call_function", "call_method") or not all(
                a in constant for a in node.all_input_nodes):
            continue
        if node.op == "call_method" and node.target == "size":
            continue
        constant.add(node)
    folded = [n for n in constant if n.op != "get_attr" and any(u not in constant for u in n.users)]
    if not folded:
        return
    interp = fx.Interpreter(gm)
    env: dict = {}
    for node in graph.nodes:
        if node in constant:
            env[node] = getattr(interp, node.op)(node.target, *fx.node.map_arg((node.args, node.kwargs),
                                                                              lambda a: env[a]))
    holder = nn.Module()
    gm.add_module("_folded", holder)
    for node in folded:
        value = env[node]
        if not torch.is_tensor(value):
            continue
        holder.register_buffer(node.name, value.detach().clone())
        with graph.inserting_before(node):
            new = graph.get_attr(f"_folded.{node.name}")
        new.meta.update({k: v for k, v in node.meta.items() if k in _KEEP_META})
        node.replace_all_uses_with(new, delete_user_cb=lambda u: u not in constant)
    graph.eliminate_dead_code()


def _drop_empty_cat_members(gm: fx.GraphModule) -> None:
    """Leave constants with no elements out of concatenations: the empty key/value cache a transformers model
    made at capture (``torch.cat([cache, k], -2)``) adds nothing, and an empty quantizer member has no range."""
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is torch.cat and isinstance(node.args[0], (list, tuple)):
            members = [a for a in node.args[0] if not (isinstance(a, fx.Node) and a.op == "get_attr" and
                                                      torch.is_tensor(v := _attr(gm, a.target)) and v.numel() == 0)]
            if len(members) == len(node.args[0]):
                continue
            if len(members) == 1:
                node.replace_all_uses_with(members[0])
            else:
                node.args = (members,) + tuple(node.args[1:])
    gm.graph.eliminate_dead_code()


def _attr(gm, target: str):
    owner, _, name = target.rpartition(".")
    return getattr(gm.get_submodule(owner), name, None)
