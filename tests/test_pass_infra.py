"""Pass infrastructure: PassManager (one recompile per modified pass, timings, failures named), Pipeline
editing and spelling, plain-function passes, string pipelines."""
from dataclasses import dataclass

import pytest
import torch
from torch import fx, nn

import quantfx
from quantfx.pass_infra import Pass, PassManager, PassResult, Pipeline
from quantfx.zoo import LeNet, example_input


def test_recompiles_once_per_modified_pass(monkeypatch):
    calls = []
    original = fx.GraphModule.recompile

    def counting(self):
        calls.append(1)
        return original(self)

    pipeline = quantfx.pipeline_for("finn", example_inputs=(example_input("lenet", 1),))
    manager = PassManager(pipeline)
    monkeypatch.setattr(fx.GraphModule, "recompile", counting)
    gm = manager.run(LeNet().eval())
    modified = sum(1 for r in manager.records if r.modified)
    assert len(manager.records) == len(pipeline) == 8
    # fx.GraphModule's constructor compiles once; then one recompile per modified pass, never per node
    assert len(calls) == modified + 1
    assert all(r.seconds >= 0 for r in manager.records) and "fuse_conv_bn" in manager.timings()
    assert isinstance(gm, fx.GraphModule)


def test_failure_names_the_pass_and_those_before_it():
    def explode(gm):
        raise RuntimeError("boom")
    pipeline = quantfx.pipeline_for("finn").insert_after("fuse_conv_bn", explode)
    with pytest.raises(quantfx.PassError, match=r"pass 'explode' failed: RuntimeError: boom \(passes run before "
                                                r"it: trace, propagate_shapes, canonicalize, fuse_conv_bn\)"):
        PassManager(pipeline).run(LeNet().eval())


def test_user_errors_keep_their_type_and_gain_the_pass_name():
    with pytest.raises(quantfx.QuantArgumentError, match=r"in pass 'swap_modules'"):
        quantfx.quantize(LeNet().eval(), "finn", overrides={"nope": None})


@dataclass(frozen=True)
class CountConvs(Pass):
    name = "count_convs"
    threshold: int = 0

    def requires(self, gm):
        if not isinstance(gm, fx.GraphModule):
            raise TypeError("needs a GraphModule")

    def call(self, gm):
        gm.meta_convs = sum(1 for m in gm.modules() if isinstance(m, nn.Conv2d))
        return PassResult(gm, False)


def test_pipeline_editing_and_spelling():
    pipeline = quantfx.pipeline_for("finn")
    pipeline.insert_after("swap_modules", CountConvs(threshold=3))
    assert pipeline.names().index("count_convs") == pipeline.names().index("swap_modules") + 1
    assert "count_convs{threshold=3}" in pipeline.spell()
    pipeline.remove("count_convs")
    assert pipeline.spell() == ("trace,propagate_shapes,canonicalize,fuse_conv_bn,swap_modules,share_quantizers,"
                                "choose_bias_scaling,annotate")
    with pytest.raises(quantfx.QuantFXError, match="no pass named 'nope'"):
        pipeline.insert_before("nope", CountConvs())


def test_function_pass_in_quantize():
    seen = []

    def record(gm):
        seen.append(len(gm.graph.nodes))
        return gm
    pipeline = quantfx.pipeline_for("finn").insert_after("canonicalize", record)
    quantfx.quantize(LeNet().eval(), "finn", pipeline=pipeline, example_inputs=(example_input("lenet", 1),))
    assert len(seen) == 1 and seen[0] > 10


def test_string_pipeline_quantizes_like_the_default():
    x = example_input("lenet", 4)
    data = [example_input("lenet", 4, seed=i) for i in range(2)]
    torch.manual_seed(0)
    model = LeNet().eval()
    default = quantfx.quantize(model, "finn", calibration_data=data, progress=False)
    spelled = quantfx.parse_pipeline("trace,propagate_shapes,canonicalize,fuse_conv_bn,swap_modules,"
                                     "share_quantizers,choose_bias_scaling,annotate", target="finn")
    custom = quantfx.quantize(model, "finn", calibration_data=data, progress=False, pipeline=spelled)
    assert torch.equal(default(x), custom(x))
    with pytest.raises(quantfx.QuantArgumentError, match="unknown pass 'fuse'"):
        quantfx.parse_pipeline("trace,fuse")


def test_requires_is_checked():
    with pytest.raises(quantfx.PassError, match="needs a GraphModule"):
        PassManager(Pipeline([CountConvs()])).run(LeNet())
