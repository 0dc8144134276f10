"""The checks tests/test_properties.py runs on each generated model (importable by regression tests too)."""
from __future__ import annotations

import contextlib
import re
import signal
import tempfile
from pathlib import Path

from hypothesis import strategies as st
from torch import fx

import quantfx
from quantfx.errors import QuantArgumentError, QuantFXError
from quantfx.lowering import BACKENDS
from quantfx.targets import available_targets, get_profile

from property_models import ModelSpec, build, inputs

CALIB_BATCHES = 2
BATCH = 2
HANG_SECONDS = 60

# Options per target beyond bit widths; a target not named here is tested with its profile's defaults and bit
# widths drawn from its profile's ranges.
TARGET_OPTIONS = {"torch": {}, "onnx": {}, "finn": {}}


def targets_with_backends() -> list[str]:
    return sorted(set(BACKENDS) | set(available_targets()))


def bit_width_choices(target: str) -> list[tuple[int, int]]:
    """(weight, activation) widths in 2..8 the target's profile accepts (a profile refuses some pairs: onnx's
    int16 pair rule on x86 without VNNI)."""
    profile = get_profile(target)
    pairs = []
    for w in range(max(2, profile.weight_bit_range[0]), min(8, profile.weight_bit_range[1]) + 1):
        for a in range(max(2, profile.act_bit_range[0]), min(8, profile.act_bit_range[1]) + 1):
            try:
                profile.replace(weight_bit_width=w, act_bit_width=a, input_bit_width=a)
            except QuantArgumentError:
                continue
            pairs.append((w, a))
    return pairs


def bit_widths(target: str):
    """Mostly the profile's defaults (None), else a pair it accepts."""
    choices = bit_width_choices(target)
    return st.one_of(st.just(None), st.sampled_from(choices)) if choices else st.just(None)


def quantize_kwargs(target: str, bits) -> dict:
    kw = dict(TARGET_OPTIONS.get(target, {}), progress=False)
    if bits is not None:
        kw.update(weight_bit_width=bits[0], act_bit_width=bits[1], input_bit_width=bits[1])
    return kw


@contextlib.contextmanager
def no_hang(seconds: int = HANG_SECONDS):
    """AssertionError when the block runs longer than ``seconds`` (a hang), where SIGALRM exists."""
    if not hasattr(signal, "SIGALRM"):
        yield
        return

    def alarm(*_):
        raise AssertionError(f"hang: still running after {seconds} s")
    old = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def construct_names(model, trace: bool = True) -> set[str]:
    """Names an error may use for a construct of ``model``: its module names (dotted and with underscores) and
    the node names of its fx graph (a GraphModule's own, or its float trace)."""
    names = {n for n, _ in model.named_modules() if n}
    names |= {n.replace(".", "_") for n in names}
    if not trace:
        return names | {n.name for n in model.graph.nodes if n.op not in ("placeholder", "output")}
    try:
        names |= {n.name for n in fx.symbolic_trace(model).graph.nodes if n.op not in ("placeholder", "output")}
    except Exception:  # untraceable: quantize's TraceError names the source line instead
        pass
    return names


def names_a_construct(message: str, names) -> bool:
    return any(re.search(rf"(?<![\w.]){re.escape(n)}(?![\w])", message) for n in names)


def compile_export_verify(spec: ModelSpec, target: str, bits=None):
    """quantize -> calibrate -> export (a temporary file) -> verify. Returns ('ok', report) or ('refused', error)
    for a QuantFXError that names a construct of the model; raises AssertionError for a mismatch over 1 LSB, an
    error that names nothing, or one that wraps another exception (the lowering core and the pass manager re-raise
    any failure as a QuantFXError naming the node or pass: that is a crash, not a refusal); any other exception
    propagates."""
    model = build(spec)
    calib = [inputs(spec, BATCH, seed=spec.seed + 10 + i) for i in range(CALIB_BATCHES)]
    x = inputs(spec, BATCH, seed=spec.seed + 99)
    q = None
    with no_hang(), tempfile.TemporaryDirectory() as tmp:
        try:
            q = quantfx.quantize(model, target, calibration_data=calib, **quantize_kwargs(target, bits))
            suffix = BACKENDS[target].suffix
            path = Path(tmp) / f"model{suffix}"
            quantfx.export(q, path, example_inputs=(calib[0][:1],))
            # eagerly only: a torch.compile per random model would dominate the suite (tests/test_torch_pt2.py and
            # test_torch_isa.py run the .pt2 compiled)
            report = quantfx.verify(q, path, (x,), variants=False)
        except QuantFXError as e:
            cause = e.__cause__
            assert cause is None or isinstance(cause, QuantFXError), (
                f"an internal error wrapped in {type(e).__name__}: {e}")  # a crash, not a refusal
            names = construct_names(model)
            if q is not None:  # the compiled graph's nodes and modules (x_quant, conv_1_quant, ...)
                names |= construct_names(q, trace=False)
            assert names_a_construct(str(e), names), (
                f"{type(e).__name__} names no layer or node of the model: {e}\nnames: {sorted(names)}")
            return "refused", e
    assert report.ok and report.max_error_lsb <= 1.0 + 1e-3, str(report)
    return "ok", report
