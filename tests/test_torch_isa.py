"""torch target: a file gives the same integers whichever instruction set the runtime picks.

PyTorch's kernels choose their code path by the CPU: oneDNN's int8 convolutions use AVX512-VNNI where the CPU has
it, AVX512BW or AVX2 (``vpmaddubsw``: u8 x s8 products summed in saturating int16 pairs) elsewhere; ATen's
vectorized quantized ops (``quantized::add``, clamp, quantize) run AVX512, AVX2 or scalar loops. Both can be held
below what the CPU has by the environment of a fresh process: ``ONEDNN_MAX_CPU_ISA`` and ``ATEN_CPU_CAPABILITY``.
This test runs the files written here in subprocesses at each level this CPU can run, and checks

- the saved ``.pt`` gives the same output bytes as in this process, at 0 LSB from the fake-quant model;
- lowering again in that process makes the same decisions (the report: which add runs as ``quantized::add``)
  and every activation quantizer agrees to the bit;
- a control: a plain 8-bit oneDNN convolution (codes up to 255, weights +-127) does give other integers under
  the AVX2 cap where this CPU has VNNI, so the caps do change the arithmetic and the checks above can fail.

x86 files (the default) and onednn files pass at every level, x86 files also packed by either library (what an
x86 CPU without VNNI runs under the x86 engine: fbgemm): their requantizations are exact by construction.
fbgemm files pass at every level.

The .pt2 program of the x86 profile (the default torch artefact) is run the same way, eagerly (oneDNN's float32
convolutions, whose sums are exact on its grid, and ATen's vectorized quantize/dequantize) and for one model under
``torch.compile`` (inductor generates its C++ for the ISA ``ATEN_CPU_CAPABILITY`` names: AVX512, AVX2, scalar): the
same output bytes at every level, the fake-quant model's. (Inductor's oneDNN int8 kernels need torchao's passes,
which tests never import: tools/bench_torch.py checks them on this CPU, BENCHMARKS.md.)

fbgemm picks its kernels from cpuinfo with no cap; its files are covered by the int16 pair rule (W7A8:
255 x (64 + 64) <= 32767, no pair can saturate) and by running the suite on AVX2 and AVX512-VNNI machines (docs/torch_pt2.md, "x86 is exact on every x86 CPU")."""
import os
import pickle
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import quantfx
from quantfx.export import _intermediates
from quantfx.targets import torch_profile
from quantfx.zoo import TEST_MODELS, example_input

MODELS = ("resnet", "unet", "mobilenetv2")   # residual adds, decoder ties, depthwise convs
PT2_COMPILED = "resnet"  # the .pt2 compiled at every level too (a compile per level: one model)
ENGINES = ("x86", "fbgemm", "onednn")

# one child process per level: (ONEDNN_MAX_CPU_ISA, ATEN_CPU_CAPABILITY); None leaves the variable unset
LEVELS = {"native": (None, None), "avx512_core": ("AVX512_CORE", "avx512"), "avx2": ("AVX2", "avx2"),
          "scalar_aten": (None, "default")}

CHILD = textwrap.dedent(r"""
    import json, pickle, sys, warnings
    import numpy as np, torch
    warnings.filterwarnings("ignore")
    import quantfx
    from quantfx.targets.torch_quantized import load_program, quantized_engine, run_program, run_program_intermediates
    import torch.ao.nn.quantized as nnq
    work = sys.argv[1]
    cases = pickle.load(open(work + "/cases.pkl", "rb"))
    out = {"aten": torch.backends.cpu.get_cpu_capability()}
    results = {}
    import torch.ao.quantization.fx._decomposed  # the quantized_decomposed ops of the .pt2 programs
    for key, case in list(cases.items()):
        if key.endswith("/pt2"):
            ep = torch.export.load(case["path"])
            with torch.no_grad():
                results[key] = {"eager": ep.module()(case["x"]).numpy()}
                # inductor's C++ uses at::vec, which ATen's scalar build ("default") does not declare: compiled
                # runs at the vectorised levels only
                if case["compile"] and out["aten"] != "DEFAULT":
                    torch._inductor.config.freezing = True
                    fn = torch.compile(ep.module())
                    results[key]["compiled"] = fn(case["x"]).numpy()
            del cases[key]
    for key, case in cases.items():
        program = load_program(case["path"])
        file_out = run_program(program, (case["x"],))
        relowered = quantfx.lower(case["qmodel"], (case["x"][:1],), format="torchscript")
        inter = run_program_intermediates(relowered, (case["x"],), case["names"])
        results[key] = {"file": file_out, "inter": inter, "report": relowered.report}
        if key.endswith("/x86"):
            # the x86 engine runs oneDNN convolutions on Linux CPUs with AVX512-VNNI and fbgemm on every other
            # x86 CPU: the same file packed by each library, whichever this CPU would pick
            for lib in ("fbgemm", "onednn"):
                with quantized_engine(lib):
                    packed = torch.jit.load(case["path"])
                    with torch.no_grad():
                        results[key]["file_" + lib] = packed(case["x"]).numpy()
    # a control for the library switch: an odd output zero point on exact ties (multiplier 1/2) rounds once in
    # fbgemm (rne(v) + zp) and once more in oneDNN (rne(v + zp)), which the x86 profile's even zero points avoid
    ties = {}
    for lib in ("fbgemm", "onednn"):
        with quantized_engine(lib):
            conv = nnq.Conv2d(4, 4, 1)
            w = torch.eye(4).reshape(4, 4, 1, 1).to(torch.int8)
            conv.set_weight_bias(torch._make_per_tensor_quantized_tensor(w, 0.5, 0), None)
            conv.scale, conv.zero_point = 1.0, 1
            codes = torch.arange(64, dtype=torch.uint8).reshape(1, 4, 4, 4)
            ties[lib] = conv(torch._make_per_tensor_quantized_tensor(codes, 1.0, 0)).int_repr().numpy()
    results["ties"] = ties
    # the control: a full 8-bit oneDNN conv, whose int16 pair sums saturate on AVX2 but not with VNNI
    g = torch.Generator().manual_seed(0)
    with quantized_engine("onednn"):
        conv = nnq.Conv2d(16, 8, 3)
        w = torch.randint(-127, 128, (8, 16, 3, 3), generator=g).to(torch.int8)
        conv.set_weight_bias(torch._make_per_tensor_quantized_tensor(w, 0.01, 0), None)
        conv.scale, conv.zero_point = 1000.0, 0
        codes = torch.randint(200, 256, (1, 16, 10, 10), generator=g).to(torch.uint8)
        results["control"] = conv(torch._make_per_tensor_quantized_tensor(codes, 1.0, 0)).int_repr().numpy()
    pickle.dump({"meta": out, "results": results}, open(work + "/out.pkl", "wb"))
""")


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    if "onednn" not in torch.backends.quantized.supported_engines:
        pytest.skip("this PyTorch build has no onednn quantized engine")
    work = tmp_path_factory.mktemp("isa")
    cases, expected = {}, {}
    for name in MODELS:
        ctor, _ = TEST_MODELS[name]
        data = [example_input(name, batch=4, seed=i) for i in range(4)]
        x = example_input(name, batch=4, seed=31)
        for engine in ENGINES:
            torch.manual_seed(0)
            q = quantfx.quantize(ctor().eval(), torch_profile(engine), calibration_data=data, progress=False)
            path = work / f"{name}_{engine}.pt"
            program = quantfx.export(q, path, example_inputs=(x[:1],), format="torchscript")
            if engine == "x86":
                pt2 = work / f"{name}.pt2"
                quantfx.export(q, pt2, example_inputs=(x[:1],))
                with torch.no_grad():
                    cases[f"{name}/pt2"] = {"path": str(pt2), "x": x, "compile": name == PT2_COMPILED}
                    expected[f"{name}/pt2"] = {"out": q(x).numpy()}
            inter = _intermediates(q, (x,))
            with torch.no_grad():
                y = q(x)
            key = f"{name}/{engine}"
            cases[key] = {"path": str(path), "x": x, "qmodel": q, "names": sorted(inter)}
            expected[key] = {"inter": inter, "out": y.numpy(), "report": program.report,
                             "file": quantfx.targets.torch_quantized.run_program(
                                 quantfx.targets.torch_quantized.load_program(path), (x,))}
    with open(work / "cases.pkl", "wb") as f:
        pickle.dump(cases, f)
    return work, expected


def _run_child(work, level):
    isa, aten = LEVELS[level]
    env = {k: v for k, v in os.environ.items() if k not in ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY")}
    env.update({k: v for k, v in (("ONEDNN_MAX_CPU_ISA", isa), ("ATEN_CPU_CAPABILITY", aten)) if v})
    env["ONEDNN_VERBOSE"] = "1"   # its first line names the ISA oneDNN runs
    # inductor's cache of this level alone, as on a machine of that CPU: torch 2.14 keys its FX graph cache without
    # the vector ISA ATEN_CPU_CAPABILITY picks (test_compiled_runs_are_not_served_another_isas_cached_kernels)
    env["TORCHINDUCTOR_CACHE_DIR"] = str(work / f"inductor-{level}")
    run = subprocess.run([sys.executable, "-c", CHILD, str(work)], env=env, capture_output=True, text=True,
                         timeout=1800)  # a torch.compile of the .pt2 per level: minutes on a loaded machine
    assert run.returncode == 0, run.stderr[-3000:]
    isa_line = next((ln for ln in run.stdout.splitlines() if ",isa:" in ln), "")
    with open(work / "out.pkl", "rb") as f:
        out = pickle.load(f)
    out["meta"]["onednn"] = isa_line.split(",isa:", 1)[-1]
    return out


@pytest.fixture(scope="module")
def runs(cases):
    work, _ = cases
    return {level: _run_child(work, level) for level in LEVELS}


def _mismatches(want, res) -> list:
    """Where a run in a child process parts from this process: the saved file's outputs, the decisions of a
    lowering there (the report), every activation quantizer of that lowering."""
    bad = [f"output {i}" for i, (a, b) in enumerate(zip(res["file"], want["file"])) if not np.array_equal(a, b)]
    if res["report"] != want["report"]:
        bad.append("report")
    assert len(res["inter"]) >= 2
    return bad + [f"{node}: {int((v != want['inter'][node]).sum())} of {v.size}" for node, v in res["inter"].items()
                  if not np.array_equal(v, want["inter"][node])]


@pytest.mark.parametrize("level", sorted(LEVELS))
def test_fbgemm_files_give_the_same_integers_at_every_instruction_set(cases, runs, level):
    """The fbgemm profile (the default before x86): ATen's AVX512, AVX2 and scalar loops (quantized::add, clamp)
    and every oneDNN ISA give the file's integers, at 0 LSB from the fake-quant model."""
    _, expected = cases
    got = runs[level]
    for key, want in expected.items():
        if key.endswith("/fbgemm"):
            assert np.array_equal(want["file"][0], want["out"]), key
            assert _mismatches(want, got["results"][key]) == [], (level, key, got["meta"])


@pytest.mark.parametrize("level", sorted(LEVELS))
def test_x86_files_give_the_same_integers_from_either_library_at_every_instruction_set(cases, runs, level):
    """The default profile ('x86'): its requantizations are exact in float32 (power-of-two activation scales, even
    zero points, multipliers on the 2^-15 grid), so the file gives the fake-quant model's integers whether its
    convolutions are packed by oneDNN (a Linux CPU with AVX512-VNNI under the x86 engine; under a cap, oneDNN's
    AVX512BW and AVX2 kernels) or by fbgemm (every other x86 CPU), and ATen's loops at every level."""
    _, expected = cases
    got = runs[level]
    for key, want in expected.items():
        if key.endswith("/x86"):
            res = got["results"][key]
            assert np.array_equal(want["file"][0], want["out"]), key
            assert _mismatches(want, res) == [], (level, key, got["meta"])
            for lib in ("fbgemm", "onednn"):
                assert np.array_equal(res["file_" + lib], want["out"]), (level, key, lib, got["meta"])


@pytest.mark.parametrize("level", sorted(LEVELS))
def test_pt2_files_give_the_same_integers_eagerly_and_compiled_at_every_instruction_set(cases, runs, level):
    """The default .pt2 program, eagerly and under torch.compile, gives the fake-quant model's outputs to the bit
    with oneDNN and ATen (and inductor's generated code) held at each instruction set, each level compiling into a
    cache of its own as a machine of that CPU does (a cache shared with an AVX512 process: the test below)."""
    _, expected = cases
    got = runs[level]
    keys = [k for k in expected if k.endswith("/pt2")]
    assert len(keys) == len(MODELS)
    for key in keys:
        res = got["results"][key]
        assert np.array_equal(res["eager"], expected[key]["out"]), (level, key, got["meta"])
        if key.startswith(PT2_COMPILED + "/") and level != "scalar_aten":
            assert np.array_equal(res["compiled"], expected[key]["out"]), (level, key, got["meta"])


def test_the_two_libraries_round_ties_otherwise_with_an_odd_zero_point(runs):
    """The control for the test above: the library switch is real. At exact ties with an odd zero point fbgemm
    and oneDNN give other integers (so an x86 file whose zero points were odd would fail that test)."""
    ties = runs["native"]["results"]["ties"]
    assert (ties["fbgemm"] != ties["onednn"]).sum() >= 16, ties


@pytest.mark.parametrize("level", sorted(LEVELS))
def test_onednn_files_at_every_instruction_set(cases, runs, level):
    """The onednn profile, exact like x86's: oneDNN's AVX512-VNNI, AVX512BW and AVX2 kernels give the same
    integers (before its requantizations were made exact, the AVX2 kernels parted from a file written on an
    AVX512-VNNI CPU at rare ties: UNet, 201 of 8,192 outputs)."""
    _, expected = cases
    got = runs[level]
    bad = {key: _mismatches(want, got["results"][key]) for key, want in expected.items() if key.endswith("/onednn")}
    assert not {k: v for k, v in bad.items() if v}, (level, got["meta"], bad)


def test_the_instruction_set_caps_change_the_arithmetic(runs):
    """The caps are real: AVX2's saturating pairs give a full 8-bit conv other integers than VNNI's exact sums.
    Where this CPU has no VNNI the native level is already the saturating one and there is nothing to tell."""
    native, avx2 = runs["native"], runs["avx2"]
    assert "AVX2" in avx2["meta"]["onednn"] and "AVX-512" not in avx2["meta"]["onednn"], avx2["meta"]
    assert avx2["meta"]["aten"] == "AVX2" and runs["scalar_aten"]["meta"]["aten"] == "DEFAULT"
    if "DL Boost" not in native["meta"]["onednn"] and "VNNI" not in native["meta"]["onednn"]:
        pytest.skip(f"this CPU's oneDNN ISA is {native['meta']['onednn']!r}: no VNNI to compare AVX2 with")
    a, b = native["results"]["control"], avx2["results"]["control"]
    assert (a != b).sum() > 10, "the AVX2 cap did not change oneDNN's arithmetic"


SHARED_CACHE_CHILD = textwrap.dedent(r"""
    import pickle, sys
    import numpy as np, torch
    import torch.ao.quantization.fx._decomposed  # noqa: F401
    from quantfx.targets import torch_pt2_runtime
    path, x = pickle.load(open(sys.argv[1], "rb"))
    with torch.no_grad():
        torch._inductor.config.freezing = True
        raw = torch.compile(torch.export.load(path).module())(x).numpy()  # a user's own torch.compile
        torch._inductor.config.freezing = False
        ours = torch_pt2_runtime.run_compiled(torch_pt2_runtime.load(path), (x,))[0]  # quantfx.verify's run
    pickle.dump({"raw": raw, "quantfx": ours, "aten": torch.backends.cpu.get_cpu_capability()},
                open(sys.argv[2], "wb"))
""")


def test_compiled_runs_are_not_served_another_isas_cached_kernels(tmp_path):
    """torch 2.14's inductor keys its FX graph cache without the vector ISA it generates C++ for: a process capped
    at AVX2 (``ATEN_CPU_CAPABILITY=avx2``) that shares a cache directory with an AVX512 process loads the AVX512
    process's graph, whose kernels step 16 floats over 8-float AVX2 vectors (half of each buffer never written). The
    control: a plain ``torch.compile`` of the .pt2 in the capped process is far from the model's outputs. quantfx's
    compiled run passes inductor the vector width (``cpp.simdlen``, part of the key) and gives them to the bit."""
    if "avx2" not in open("/proc/cpuinfo").read() or "avx512f" not in open("/proc/cpuinfo").read():
        pytest.skip("needs a CPU with AVX512 to cap at AVX2")
    name = "mlp"  # vectorized elementwise kernels, the cheapest compile
    ctor, _ = TEST_MODELS[name]
    torch.manual_seed(0)
    q = quantfx.quantize(ctor().eval(), "torch", calibration_data=[example_input(name, batch=4, seed=i)
                                                                   for i in range(2)], progress=False)
    x = example_input(name, batch=4, seed=31)
    quantfx.export(q, tmp_path / "m.pt2", example_inputs=(x[:1],))
    with torch.no_grad():
        want = q(x).numpy()
    with open(tmp_path / "case.pkl", "wb") as f:
        pickle.dump((str(tmp_path / "m.pt2"), x), f)
    env = {k: v for k, v in os.environ.items() if k not in ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY")}
    env["TORCHINDUCTOR_CACHE_DIR"] = str(tmp_path / "inductor")  # one cache, filled by the first process
    got = {}
    for cap in ("avx512", "avx2"):
        run = subprocess.run([sys.executable, "-c", SHARED_CACHE_CHILD, str(tmp_path / "case.pkl"),
                              str(tmp_path / f"{cap}.pkl")], env=dict(env, ATEN_CPU_CAPABILITY=cap),
                             capture_output=True, text=True, timeout=1800)
        assert run.returncode == 0, run.stderr[-3000:]
        with open(tmp_path / f"{cap}.pkl", "rb") as f:
            got[cap] = pickle.load(f)
    assert got["avx2"]["aten"] == "AVX2" and got["avx512"]["aten"] == "AVX512"
    assert np.array_equal(got["avx512"]["raw"], want) and np.array_equal(got["avx512"]["quantfx"], want)
    assert not np.array_equal(got["avx2"]["raw"], want), "inductor's cache keyed the vector ISA: drop the guard?"
    assert np.array_equal(got["avx2"]["quantfx"], want)
