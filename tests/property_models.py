"""A hypothesis strategy for random float models that torch.fx traces (tests/test_properties.py).

``model_specs()`` draws a :class:`ModelSpec`: an input shape, a seed and a *program*, a list of steps over a list
of tensors (step ``i`` reads tensors by index and appends its outputs). :func:`build` turns a spec into an
``nn.Module`` whose ``forward`` runs the program; ``torch.fx`` traces it into one node per step (the loop is over
static Python data). The program is plain data, so a shrunk failing example prints as something that can be
pasted into a test (``build(ModelSpec(...))``).

Steps (shapes tracked without the batch dimension: ``(C, L)`` 1-d, ``(C, H, W)`` 2-d, ``(F,)`` flat):
conv / transposed conv (1-d/2-d, groups incl. depthwise, stride, padding, dilation, bias, optional BatchNorm),
linear (on flat tensors and on the last dimension), ReLU / ReLU6 / LeakyReLU / Hardtanh / Sigmoid / Hardswish
(modules or functional), residual blocks (conv, act, add back) and adds of any two tensors of one shape (an add
of an add included), concatenations of tensors with equal spatial size (nested, of chunks and slices), max /
average / adaptive pooling (modules and functional, ``x.mean``), flatten / view / reshape / permute / transpose,
chunk / split / slicing, pixel shuffle / unshuffle, zero padding (module and ``F.pad``).

Models stay small (at most 16 channels, spatial sizes at most 16, a few steps) so each example compiles, exports
and runs in a fraction of a second.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from hypothesis import strategies as st
from torch import nn

MAX_C = 16
MAX_S = 16
MAX_FLAT = 256

ACTS = ("relu", "relu6", "leaky_relu", "hardtanh", "sigmoid", "hardswish")


@dataclass(frozen=True)
class Step:
    kind: str
    inputs: tuple
    params: tuple = ()  # (key, value) pairs, hashable and printable

    def p(self, key, default=None):
        return dict(self.params).get(key, default)


@dataclass(frozen=True)
class ModelSpec:
    input_shape: tuple  # without batch
    steps: tuple
    outputs: tuple  # indices of returned tensors
    seed: int = 0
    train_mode: bool = False  # the model handed to quantize is in training mode
    hook: bool = False  # a forward hook on the model (quantize must leave it in place)


# --- building -----------------------------------------------------------------------------------------------


def _layer(step: Step, in_shape: tuple) -> nn.Module | None:
    k, p = step.kind, step.p
    dim = len(in_shape) - 1
    if k == "conv":
        conv = (nn.Conv1d, nn.Conv2d)[dim - 1](in_shape[0], p("cout"), p("k"), p("stride"), p("padding"),
                                                p("dilation"), p("groups"), bias=p("bias"))
        return nn.Sequential(conv, (nn.BatchNorm1d, nn.BatchNorm2d)[dim - 1](p("cout"))) if p("bn") else conv
    if k == "convt":
        return (nn.ConvTranspose1d, nn.ConvTranspose2d)[dim - 1](
            in_shape[0], p("cout"), p("k"), p("stride"), p("padding"), groups=p("groups"), bias=p("bias"),
            dilation=p("dilation"))
    if k == "linear":
        return nn.Linear(in_shape[-1], p("out"), bias=p("bias"))
    if k == "act" and not p("functional"):
        return _act_module(p("act"))
    if k == "residual":
        conv = (nn.Conv1d, nn.Conv2d)[dim - 1](in_shape[0], in_shape[0], p("k"), 1, p("k") // 2, bias=p("bias"))
        return nn.Sequential(conv, _act_module(p("act"))) if p("act") else conv
    if k == "pool" and p("module"):
        return _pool_module(p("pool"), dim, p("k"), p("stride"), p("out"))
    if k == "flatten" and p("how") == "module":
        return nn.Flatten()
    if k == "pad" and p("module"):
        return (nn.ZeroPad1d, nn.ZeroPad2d)[dim - 1](p("pads"))
    if k == "pixel_shuffle" and p("module"):
        return nn.PixelShuffle(2) if p("up") else nn.PixelUnshuffle(2)
    return None


def _act_module(name: str) -> nn.Module:
    return {"relu": nn.ReLU, "relu6": nn.ReLU6, "leaky_relu": lambda: nn.LeakyReLU(0.1),
            "hardtanh": lambda: nn.Hardtanh(-1.5, 2.0), "sigmoid": nn.Sigmoid, "hardswish": nn.Hardswish}[name]()


def _act_function(name: str, x):
    return {"relu": F.relu, "relu6": F.relu6, "leaky_relu": lambda t: F.leaky_relu(t, 0.1),
            "hardtanh": lambda t: F.hardtanh(t, -1.5, 2.0), "sigmoid": torch.sigmoid,
            "hardswish": F.hardswish}[name](x)


def _pool_module(kind: str, dim: int, k, stride, out) -> nn.Module:
    two = dim == 2
    return {"max": lambda: (nn.MaxPool2d if two else nn.MaxPool1d)(k, stride),
            "avg": lambda: (nn.AvgPool2d if two else nn.AvgPool1d)(k, stride),
            "adaptive_avg": lambda: (nn.AdaptiveAvgPool2d if two else nn.AdaptiveAvgPool1d)(out),
            "adaptive_max": lambda: (nn.AdaptiveMaxPool2d if two else nn.AdaptiveMaxPool1d)(out)}[kind]()


class GeneratedModel(nn.Module):
    """Runs a :class:`ModelSpec`'s program; step ``i``'s layer is the attribute ``<kind>_<i>``."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.spec = spec
        shapes = [tuple(spec.input_shape)]
        # step -> attribute name; step -> rank of its first input (with batch); step -> number of outputs
        self.names, self.ranks, self.n_out = {}, [], []
        for i, step in enumerate(spec.steps):
            layer = _layer(step, shapes[step.inputs[0]])
            self.ranks.append(len(shapes[step.inputs[0]]) + 1)
            if layer is not None:
                self.names[i] = f"{step.kind}_{i}"
                self.add_module(self.names[i], layer)
            out = step_shapes(step, [shapes[j] for j in step.inputs])
            self.n_out.append(len(out))
            shapes.extend(out)

    def forward(self, x):
        ts = [x]
        for i, step in enumerate(self.spec.steps):
            ts.extend(self._run(i, step, [ts[j] for j in step.inputs]))
        outs = tuple(ts[j] for j in self.spec.outputs)
        return outs[0] if len(outs) == 1 else outs

    def _run(self, i: int, step: Step, xs: list) -> list:
        k, p = step.kind, step.p
        layer = getattr(self, self.names[i]) if i in self.names else None
        x = xs[0]
        two = self.ranks[i] == 4  # static: fx traces this branch away
        if k in ("conv", "convt", "linear"):
            return [layer(x)]
        if k == "act":
            return [layer(x) if layer is not None else _act_function(p("act"), x)]
        if k == "residual":
            return [layer(x) + x]
        if k == "add":
            return [xs[0] + xs[1]] if p("how") == "op" else [torch.add(xs[0], xs[1])]
        if k == "cat":
            return [torch.cat(xs, 1)]
        if k == "pool":
            if layer is not None:
                return [layer(x)]
            kind = p("pool")
            if kind == "max":
                return [(F.max_pool2d if two else F.max_pool1d)(x, p("k"), p("stride"))]
            if kind == "avg":
                return [(F.avg_pool2d if two else F.avg_pool1d)(x, p("k"), p("stride"))]
            if kind == "adaptive_avg" and p("out") == 1 and p("mean"):
                return [x.mean((2, 3) if two else 2, keepdim=True)]
            if kind == "adaptive_avg":
                return [(F.adaptive_avg_pool2d if two else F.adaptive_avg_pool1d)(x, p("out"))]
            return [(F.adaptive_max_pool2d if two else F.adaptive_max_pool1d)(x, p("out"))]
        if k == "flatten":
            how = p("how")
            if how == "module":
                return [layer(x)]
            if how == "torch":
                return [torch.flatten(x, 1)]
            if how == "view":
                return [x.view(x.size(0), -1)]
            return [x.reshape(x.shape[0], -1)]
        if k == "to1d":  # (N, C, H, W) -> (N, C, H*W)
            return [x.view(x.size(0), x.size(1), -1) if p("view") else torch.reshape(x, (x.shape[0], x.shape[1], -1))]
        if k == "permute":
            if p("how") == "transpose":
                return [x.transpose(-1, -2)]
            return [x.permute(0, 1, 3, 2) if two else x.permute(0, 2, 1)]
        if k == "chunk":
            pieces = x.chunk(p("n"), 1) if p("how") == "chunk" else torch.split(x, list(p("sizes")), 1)
            return [pieces[j] for j in range(self.n_out[i])]  # a Proxy cannot be iterated
        if k == "slice":
            return [x[:, p("start"):p("stop")]]
        if k == "pixel_shuffle":
            if layer is not None:
                return [layer(x)]
            return [F.pixel_shuffle(x, 2) if p("up") else F.pixel_unshuffle(x, 2)]
        if k == "pad":
            if layer is not None:
                return [layer(x)]
            return [F.pad(x, p("pads"), value=p("value"))]
        raise AssertionError(k)


def build(spec: ModelSpec) -> nn.Module:
    """The float model of ``spec``: weights from ``spec.seed``, BatchNorm statistics non-trivial, in training mode
    when ``spec.train_mode`` (else eval), with a forward hook when ``spec.hook``."""
    torch.manual_seed(spec.seed)
    model = GeneratedModel(spec)
    g = torch.Generator().manual_seed(spec.seed + 1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                n = m.num_features
                m.running_mean.copy_(0.1 * torch.randn(n, generator=g))
                m.running_var.copy_(0.5 + torch.rand(n, generator=g))
                m.weight.copy_(0.5 + torch.rand(n, generator=g))
                m.bias.copy_(0.1 * torch.randn(n, generator=g))
    model.train(spec.train_mode)
    if spec.hook:
        model.register_forward_hook(lambda module, args, out: None)
    return model


def inputs(spec: ModelSpec, batch: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn((batch, *spec.input_shape), generator=g)


# --- shapes -------------------------------------------------------------------------------------------------


def _conv_out(s, k, stride, pad, dil):
    return (s + 2 * pad - dil * (k - 1) - 1) // stride + 1


def _convt_out(s, k, stride, pad, dil):
    return (s - 1) * stride - 2 * pad + dil * (k - 1) + 1


def step_shapes(step: Step, ins: list) -> list:
    """Output shapes (without batch) of ``step`` on input shapes ``ins``."""
    k, p = step.kind, step.p
    x = ins[0]
    c, sp = x[0], x[1:]
    if k == "conv":
        return [(p("cout"), *(_conv_out(s, p("k"), p("stride"), p("padding"), p("dilation")) for s in sp))]
    if k == "convt":
        return [(p("cout"), *(_convt_out(s, p("k"), p("stride"), p("padding"), p("dilation")) for s in sp))]
    if k == "linear":
        return [(*x[:-1], p("out"))]
    if k in ("act", "residual", "add"):
        return [x]
    if k == "cat":
        return [(sum(i[0] for i in ins), *sp)]
    if k == "pool":
        if p("pool") in ("adaptive_avg", "adaptive_max"):
            return [(c, *(p("out"),) * len(sp))]
        return [(c, *(_conv_out(s, p("k"), p("stride"), 0, 1) for s in sp))]
    if k == "flatten":
        return [(math.prod(x),)]
    if k == "to1d":
        return [(c, sp[0] * sp[1])]
    if k == "permute":
        if len(x) == 3:
            return [(c, sp[1], sp[0])]
        return [(sp[0], c)]
    if k == "chunk":
        if p("how") == "chunk":
            size = math.ceil(c / p("n"))
            sizes = [size] * (c // size) + ([c % size] if c % size else [])
        else:
            sizes = list(p("sizes"))
        return [(s, *sp) for s in sizes]
    if k == "slice":
        return [(p("stop") - p("start"), *sp)]
    if k == "pixel_shuffle":
        if p("up"):
            return [(c // 4, *(s * 2 for s in sp))]
        return [(c * 4, *(s // 2 for s in sp))]
    if k == "pad":
        pads = p("pads")
        if len(sp) == 1:
            return [(c, sp[0] + pads[0] + pads[1])]
        return [(c, sp[0] + pads[2] + pads[3], sp[1] + pads[0] + pads[1])]
    raise AssertionError(k)


def _fits(shape) -> bool:
    return shape[0] <= MAX_C and all(1 <= s <= MAX_S for s in shape[1:]) if len(shape) > 1 \
        else 1 <= shape[0] <= MAX_FLAT


# --- the strategy -------------------------------------------------------------------------------------------


def _divisors(n):
    return [d for d in range(1, n + 1) if n % d == 0]


# in the order shrinking prefers; joins (add, cat) and convs weighted up
KINDS = ("conv", "act", "residual", "add", "cat", "pool", "linear", "convt", "flatten", "chunk", "slice",
         "permute", "to1d", "pixel_shuffle", "pad", "cat", "add", "conv", "cat")


@st.composite
def _step(draw, shapes: list) -> Step | None:
    """One step reading tensors of ``shapes`` (an index counted back from the newest, so shrinking prefers the
    newest), or None when the drawn kind does not apply."""
    back = draw(st.integers(0, min(3, len(shapes) - 1)))
    src = len(shapes) - 1 - back
    x = shapes[src]
    c, sp = x[0], x[1:]
    spatial = len(x) > 1
    kind = draw(st.sampled_from(KINDS))
    b = st.booleans()
    if kind == "conv" and spatial:
        k = draw(st.integers(1, 3))
        dilation = draw(st.integers(1, 2)) if k > 1 else 1
        depthwise = draw(b)
        if depthwise:
            groups, cout = c, c * draw(st.integers(1, 2))
        else:
            groups = draw(st.sampled_from(_divisors(c)))
            cout = groups * draw(st.integers(1, max(1, 8 // groups)))
        return Step("conv", (src,), (("cout", cout), ("k", k), ("stride", draw(st.integers(1, 2))),
                                     ("padding", draw(st.integers(0, (k // 2) * dilation))),
                                     ("dilation", dilation), ("groups", groups), ("bias", draw(b)),
                                     ("bn", draw(b))))
    if kind == "convt" and spatial:
        k = draw(st.integers(1, 3))
        stride = draw(st.integers(1, 2))
        dilation = draw(st.integers(1, 2)) if k > 1 else 1
        groups = draw(st.sampled_from(_divisors(c)))
        cout = groups * draw(st.integers(1, max(1, 6 // groups)))
        return Step("convt", (src,), (("cout", cout), ("k", k), ("stride", stride),
                                      ("padding", draw(st.integers(0, dilation * (k - 1) // 2))),
                                      ("dilation", dilation), ("groups", groups), ("bias", draw(b))))
    if kind == "linear":
        return Step("linear", (src,), (("out", draw(st.integers(1, 8))), ("bias", draw(b))))
    if kind == "act":
        return Step("act", (src,), (("act", draw(st.sampled_from(ACTS))), ("functional", draw(b))))
    if kind == "residual" and spatial:
        act = draw(st.sampled_from((None,) + ACTS))
        return Step("residual", (src,), (("k", draw(st.sampled_from((1, 3)))), ("act", act), ("bias", draw(b))))
    if kind == "add":
        same = [i for i, s in enumerate(shapes) if s == x]
        other = draw(st.sampled_from(same[::-1]))
        return Step("add", (src, other), (("how", draw(st.sampled_from(("op", "torch")))),))
    if kind == "cat" and spatial:
        same = [i for i, s in enumerate(shapes) if len(s) == len(x) and s[1:] == sp][::-1]  # src too: cat([x, x])
        others = draw(st.lists(st.sampled_from(same), min_size=1, max_size=2))
        return Step("cat", (src, *others))
    if kind == "pool" and spatial:
        pool = draw(st.sampled_from(("max", "avg", "adaptive_avg", "adaptive_max")))
        if pool.startswith("adaptive"):
            out = draw(st.integers(1, 2))
            return Step("pool", (src,), (("pool", pool), ("out", out), ("module", draw(b)), ("mean", draw(b))))
        k = draw(st.integers(2, 3))
        if min(sp) < k:
            return None
        return Step("pool", (src,), (("pool", pool), ("k", k), ("stride", draw(st.integers(1, k))),
                                     ("module", draw(b))))
    if kind == "flatten" and spatial and draw(b):  # half as often: little applies after it
        return Step("flatten", (src,), (("how", draw(st.sampled_from(("torch", "view", "reshape", "module")))),))
    if kind == "to1d" and len(x) == 3:
        return Step("to1d", (src,), (("view", draw(b)),))
    if kind == "permute" and spatial:
        return Step("permute", (src,), (("how", draw(st.sampled_from(("permute", "transpose")))),))
    if kind == "chunk" and spatial and c >= 2:
        if draw(b):
            return Step("chunk", (src,), (("how", "chunk"), ("n", draw(st.integers(2, min(3, c))))))
        first = draw(st.integers(1, c - 1))
        return Step("chunk", (src,), (("how", "split"), ("sizes", (first, c - first))))
    if kind == "slice" and spatial and c >= 2:
        start = draw(st.integers(0, c - 1))
        return Step("slice", (src,), (("start", start), ("stop", draw(st.integers(start + 1, c)))))
    if kind == "pixel_shuffle" and len(x) == 3:
        up = draw(b)
        if (up and c % 4) or (not up and (sp[0] % 2 or sp[1] % 2)):
            return None
        return Step("pixel_shuffle", (src,), (("up", up), ("module", draw(b))))
    if kind == "pad" and spatial:
        pads = tuple(draw(st.integers(0, 1)) for _ in range(2 * len(sp)))
        module = draw(b)
        value = 0.0 if module else draw(st.sampled_from((0.0, 0.0, 0.5)))
        return Step("pad", (src,), (("pads", pads), ("module", module), ("value", value)))
    return None


@st.composite
def model_specs(draw, max_steps: int = 7) -> ModelSpec:
    dim = draw(st.sampled_from((2, 1, 2)))
    c0 = draw(st.integers(1, 4))
    spatial = tuple(draw(st.integers(3, 8)) for _ in range(dim))
    shapes = [(c0, *spatial)]
    steps = []
    permuted: set = set()  # tensors whose memory is laid out permuted: `view` cannot merge their dimensions
    for _ in range(draw(st.integers(1, max_steps))):
        for _attempt in range(4):  # a drawn kind may not apply to the tensor drawn, or outgrow the size limits
            step = draw(_step(shapes))
            out = step_shapes(step, [shapes[j] for j in step.inputs]) if step is not None else []
            if step is not None and all(_fits(s) for s in out):
                break
        else:
            continue
        if step.kind in ("flatten", "to1d") and step.inputs[0] in permuted:
            step = Step(step.kind, step.inputs, tuple((k, "reshape" if k == "how" and v == "view" else
                                                       False if k == "view" else v) for k, v in step.params))
        if step.kind == "permute" or (step.kind in ("act", "add", "slice", "chunk", "residual")
                                      and any(j in permuted for j in step.inputs)):
            permuted.update(range(len(shapes), len(shapes) + len(out)))
        steps.append(step)
        shapes.extend(out)
    if not steps:
        steps.append(Step("act", (0,), (("act", "relu"), ("functional", False))))
        shapes.append(shapes[0])
    last = len(shapes) - 1
    outputs = (last,)
    if last > 1 and draw(st.integers(0, 4)) == 0:
        outputs = (last, draw(st.integers(1, last - 1)))
    return ModelSpec(shapes[0], tuple(steps), outputs, seed=draw(st.integers(0, 2 ** 16)),
                     train_mode=draw(st.booleans()), hook=draw(st.booleans()))
