"""Property-based tests over random model graphs (tests/property_models.py).

For every target with a backend: quantize -> calibrate -> export -> verify either agrees within 1 LSB in the
target's own runtime, or raises a QuantFXError whose message names a layer or node of the model. Any other
exception, a hang, or a mismatch over 1 LSB fails. On every generated model, for every target profile: each
add/cat's inputs share one quantizer (or, for adds on add_grid='scale' profiles, one scale), the input model is
unchanged (state_dict bytes, training flags, hooks), and quantizing it twice gives equal results.

CI-sized by default (derandomized, so CI runs the same examples every time); ``QUANTFX_LONG_PROPERTIES=1`` runs
many more, randomized. Failures found here are shrunk into tests/test_property_regressions.py.
"""
import copy
import os
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings

import quantfx
from quantfx.classify import layer_read_by_add
from quantfx.errors import QuantFXError
from quantfx.graph import USER_FLOAT_KEY, is_add, is_cat
from quantfx.passes.swap_modules import FLOAT_RESIDUAL
from quantfx.lowering import BACKENDS
from quantfx.targets import available_targets

from property_harness import bit_widths, compile_export_verify, inputs, quantize_kwargs
from property_models import build, model_specs
from test_share_quantizers import assert_one_grid_or_one_scale

LONG = os.environ.get("QUANTFX_LONG_PROPERTIES") == "1"
# CI: 80 models per target (each compiled, exported and run in well under a second)
PER_TARGET = 1000 if LONG else 80
INVARIANT_EXAMPLES = 1000 if LONG else 60


def ci_settings(n):
    return settings(max_examples=n, deadline=None, derandomize=not LONG, database=None if not LONG else
                    settings.default.database, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


ALL_TARGETS = sorted(set(BACKENDS) | set(available_targets()))


@pytest.fixture(autouse=True)
def quiet():
    with warnings.catch_warnings():  # qonnx and TorchScript warn about shapes and annotations on every model
        warnings.simplefilter("ignore")
        yield


@pytest.mark.parametrize("target", ALL_TARGETS)
def test_quantize_export_verify_within_one_lsb_or_a_named_error(target):
    if target not in BACKENDS:
        pytest.skip(f"target {target!r} has no backend yet (quantfx.export.BACKENDS)")
    outcomes = []

    @ci_settings(PER_TARGET)
    @given(spec=model_specs(), bits=bit_widths(target))
    def check(spec, bits):
        outcomes.append(compile_export_verify(spec, target, bits)[0])

    check()
    # the generator must mostly produce models the target takes, or the property says little
    assert outcomes.count("ok") >= len(outcomes) // 2, outcomes


def _state_bytes(model):
    return {k: (v.dtype, tuple(v.shape), v.detach().contiguous().numpy().tobytes())
            for k, v in model.state_dict().items()}


def _hooks(model):
    return [(name, list(m._forward_hooks.items()), list(m._forward_pre_hooks.items()),
             list(m._backward_hooks.items())) for name, m in model.named_modules()]


def _outputs(y):
    return y if isinstance(y, tuple) else (y,)


FLOAT_PREFIX = "trace,propagate_shapes,canonicalize,fuse_conv_bn"


def _quantized_state(q):
    return {k: v.detach().clone() for k, v in q.state_dict().items()}


@pytest.mark.parametrize("target", ALL_TARGETS)
def test_invariants_on_generated_models(target):
    """Every add/cat input shares one quantizer (or one scale, per the profile's add_grid); the input model is
    unchanged; Conv+BN fusion (the float passes) keeps the float outputs; quantizing the same model twice gives
    the same program, state and outputs."""
    checked = []

    @ci_settings(INVARIANT_EXAMPLES)
    @given(spec=model_specs(), bits=bit_widths(target))
    def check(spec, bits):
        model = build(spec)
        before = (_state_bytes(model), [m.training for m in model.modules()], _hooks(model))
        calib = [inputs(spec, 2, seed=spec.seed + 10 + i) for i in range(2)]
        x = inputs(spec, 2, seed=spec.seed + 99)
        results = []
        for _ in range(2):
            try:
                q = quantfx.quantize(model, target, calibration_data=calib, **quantize_kwargs(target, bits))
            except QuantFXError:  # a model the target refuses: test_quantize_export_verify names it
                assert (_state_bytes(model), [m.training for m in model.modules()], _hooks(model)) == before
                return
            with torch.no_grad():
                y = q(x)
            results.append((q, y))
        after = (_state_bytes(model), [m.training for m in model.modules()], _hooks(model))
        assert after == before, "quantize changed the input model"
        # fusion (and the passes before it) keeps the float function
        with torch.no_grad():
            fused = quantfx.quantize(model, target, example_inputs=(x,), progress=False,
                                     pipeline=quantfx.parse_pipeline(FLOAT_PREFIX, target=target))
            for a, b in zip(_outputs(copy.deepcopy(model).eval()(x)), _outputs(fused(x))):
                torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5 * (1 + float(a.abs().max())))
        (q1, y1), (q2, y2) = results
        assert q1.code == q2.code
        s1, s2 = _quantized_state(q1), _quantized_state(q2)
        assert s1.keys() == s2.keys() and all(torch.equal(s1[k], s2[k]) for k in s1)
        assert all(torch.equal(a, b) for a, b in zip(_outputs(y1), _outputs(y2)))
        # (a residual add read only by float islands stays float: no grid to share; passes/swap_modules.py; nor
        # has an add that reads a conv/linear's float output, add_reads_layer_output: its quantizer after rounds)
        reads_layer = q1.profile.add_reads_layer_output
        joins = [n for n in q1.graph.nodes if (is_add(n) and n.meta.get(USER_FLOAT_KEY) != FLOAT_RESIDUAL
                                               and not (reads_layer and layer_read_by_add(q1, n) is not None))
                 or is_cat(n)]
        for node in joins:
            assert_one_grid_or_one_scale(q1, node)
        checked.append(len(joins))

    check()
    assert checked and sum(checked) > 0, "no generated model had an add or a cat"
