"""Pass infrastructure: PassManager (one recompile after a run of graph-only passes, timings, failures named), Pipeline
editing and spelling, plain-function passes, string pipelines."""
import time
from dataclasses import dataclass

import pytest
import torch
from torch import fx, nn

import quantfx
from quantfx.nn import QuantWBIOL
from quantfx.pass_infra import Pass, PassManager, PassResult, Pipeline
from quantfx.zoo import LeNet, ResNetSmall, TEST_MODELS, example_input


def counting_recompiles(monkeypatch) -> list:
    calls = []
    original = fx.GraphModule.recompile

    def counting(self):
        calls.append(1)
        return original(self)
    monkeypatch.setattr(fx.GraphModule, "recompile", counting)
    return calls


def test_recompiles_once_after_graph_only_passes(monkeypatch):
    pipeline = quantfx.pipeline_for("finn", example_inputs=(example_input("resnet", 1),))
    gm = fx.symbolic_trace(ResNetSmall().eval())  # traced up front: the trace pass has nothing to do
    calls = counting_recompiles(monkeypatch)
    manager = PassManager(pipeline)
    start = time.perf_counter()
    out = manager.run(gm)
    wall = time.perf_counter() - start
    modified = [r.name for r in manager.records if r.modified]
    assert modified == ["canonicalize", "fuse_conv_bn", "swap_modules", "share_quantizers", "choose_bias_scaling"]
    assert len(calls) == 1  # once after the built-in passes (none runs the code), never per pass or node
    assert gm.code == gm.graph.python_code("self").src  # the code is the final graph's
    assert [r.name for r in manager.records] == pipeline.names() and len(manager.records) == 9
    assert all(r.seconds > 0 for r in manager.records) and sum(r.seconds for r in manager.records) <= wall
    assert all(f"{r.name:24s}" in manager.timings() for r in manager.records)
    assert out is gm and isinstance(gm.get_submodule("fc"), QuantWBIOL)


def test_tracing_adds_one_compile_of_the_new_graph_module(monkeypatch):
    calls = counting_recompiles(monkeypatch)
    manager = PassManager(quantfx.pipeline_for("finn", example_inputs=(example_input("lenet", 1),)))
    manager.run(LeNet().eval())  # nothing to canonicalize or share in LeNet
    modified = [r.name for r in manager.records if r.modified]
    assert modified == ["trace", "fuse_conv_bn", "swap_modules", "choose_bias_scaling"]
    assert len(calls) == 2  # fx.GraphModule's constructor compiling the traced graph, then once at the end


def test_a_pass_that_runs_the_code_sees_the_changes_before_it(monkeypatch):
    seen = []

    def run_it(gm):  # a plain function may call the module: it runs_code
        seen.append(gm.code == gm.graph.python_code("self").src)
        gm(example_input("lenet", 1))
        return PassResult(gm, False)
    pipeline = quantfx.pipeline_for("finn", example_inputs=(example_input("lenet", 1),))
    pipeline.insert_after("swap_modules", run_it)
    calls = counting_recompiles(monkeypatch)
    manager = PassManager(pipeline)
    gm = manager.run(LeNet().eval())
    assert seen == [True]  # recompiled before run_it, after fuse_conv_bn and swap_modules changed the graph
    assert len(calls) == 3  # the traced graph's compile, before run_it, after choose_bias_scaling
    assert gm.code == gm.graph.python_code("self").src
    stale = PassManager(quantfx.pipeline_for("finn", example_inputs=(example_input("lenet", 1),)))
    calls.clear()
    stale.run(LeNet().eval(), recompile=False)
    assert len(calls) == 1  # the traced graph's compile only: the caller compiles the result itself


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
                                "choose_bias_scaling,quantize_products,annotate")
    with pytest.raises(quantfx.QuantFXError, match="no pass named 'nope'"):
        pipeline.insert_before("nope", CountConvs())


def test_function_pass_in_quantize():
    seen = []

    def record(gm):
        seen.append(len(gm.graph.nodes))
        return gm
    pipeline = quantfx.pipeline_for("finn").insert_after("canonicalize", record)
    q = quantfx.quantize(LeNet().eval(), "finn", pipeline=pipeline, example_inputs=(example_input("lenet", 1),))
    canonical = quantfx.PassManager(quantfx.pipeline_for("finn").passes[:3]).run(LeNet().eval())
    assert seen == [len(canonical.graph.nodes)] == [16]  # run once, on the canonicalized graph
    names = [r.name for r in q.pass_timings]
    assert names.index("record") == names.index("canonicalize") + 1


@pytest.mark.parametrize("name", ["lenet", "resnet"])
def test_string_pipeline_quantizes_like_the_default(name):
    x = example_input(name, 4)
    data = [example_input(name, 4, seed=i) for i in range(2)]
    torch.manual_seed(0)
    model = TEST_MODELS[name][0]().eval()
    default = quantfx.quantize(model, "finn", calibration_data=data, progress=False)
    # spelled without propagate_shapes: calibration records the shapes annotate needs for pools
    spelled = quantfx.parse_pipeline("trace,canonicalize,fuse_conv_bn,swap_modules,share_quantizers,"
                                     "choose_bias_scaling,quantize_products,annotate", target="finn")
    assert spelled.names() == [n for n in quantfx.pipeline_for("finn").names() if n != "propagate_shapes"]
    custom = quantfx.quantize(model, "finn", calibration_data=data, progress=False, pipeline=spelled)
    assert torch.equal(default(x), custom(x))
    assert [(n.name, str(n.meta["quant"])) for n in custom.graph.nodes] == \
        [(n.name, str(n.meta["quant"])) for n in default.graph.nodes]
    assert [type(m).__name__ for m in custom.modules()] == [type(m).__name__ for m in default.modules()]
    with pytest.raises(quantfx.QuantArgumentError, match="unknown pass 'fuse'"):
        quantfx.parse_pipeline("trace,fuse")


def test_spelled_options_round_trip():
    pipeline = quantfx.parse_pipeline("trace{leaf_modules=('layers',)},canonicalize,annotate", target="finn")
    assert pipeline.passes[0].leaf_modules == ("layers",)
    assert pipeline.spell() == "trace{leaf_modules=('layers',)},canonicalize,annotate"


def test_dict_options_keep_their_braces():
    text = "trace,swap_modules{overrides={'fc': None, 'conv1': {'weight_bit_width': 4}}},annotate"
    pipeline = quantfx.parse_pipeline(text, target="finn")
    assert pipeline.passes[1].overrides == {"fc": None, "conv1": {"weight_bit_width": 4}}
    assert quantfx.parse_pipeline(pipeline.spell(), target="finn").passes[1].overrides == pipeline.passes[1].overrides
    with pytest.raises(quantfx.QuantArgumentError, match=r"'trace\{leaf_modules=\(\)' opens '\{' without closing"):
        quantfx.parse_pipeline("trace{leaf_modules=()")


def test_requires_is_checked():
    with pytest.raises(quantfx.PassError, match="needs a GraphModule"):
        PassManager(Pipeline([CountConvs()])).run(LeNet())
