"""torch target: latency of quantfx's int8 programs, side by side in one run.

    python tools/bench_torch.py [--models resnet18 resnet50 mobilenet_v2 vit_block] [--runs 10]
    python tools/bench_torch.py --engines [--models ...] [--profile]     # the TorchScript engines vs torch.ao FX

Default (the .pt2 table): per model (torchvision's, random weights, 224 x 224; ``*_like``: quantfx.zoo's; the ViT
block), batch 1 and 8, 1 and 2 threads, the median ms of
- quantfx's ``.pt2`` file under ``torch.compile`` (inductor, freezing on),
- torchao's PT2E flow (``X86InductorQuantizer``, ``prepare_pt2e`` / ``convert_pt2e``) under ``torch.compile``,
- the float model under ``torch.compile``,
- quantfx's TorchScript file (``format='torchscript'``, engine x86),
and for each compiled quantfx program its largest error against the fake-quant model (LSB) and the number of
oneDNN int8 kernels inductor made. Importing torchao's quantizer registers its x86 inductor passes (the dequantize /
conv / quantize fusion into ``onednn.qconv_pointwise``), which torch 2.14's inductor no longer carries: quantfx's
program is compiled with them too, as a user deploying it would. Benchmark-only: quantfx never imports torchao.

``--engines``: the TorchScript engines (x86, fbgemm, onednn) against torch.ao's FX flow, batch 1 (the older table).
"""
from __future__ import annotations

import argparse
import collections
import os
import random
import statistics
import time
import warnings

import torch

import quantfx
from quantfx import zoo
from quantfx.targets import torch_profile
from quantfx.targets.torch_quantized import quantized_engine

# quantfx's programs: label -> (profile, quantize() widths); the default first
VARIANTS = {"x86": ("x86", {}),
            "fbgemm": ("fbgemm", {}),
            "onednn": ("onednn", {})}


def cpu_name() -> str:
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return "unknown CPU"
    model = next((ln.split(":", 1)[1].strip() for ln in flags.splitlines() if ln.startswith("model name")), "?")
    isa = "AVX512-VNNI" if "avx512_vnni" in flags else "AVX2 (no VNNI)" if "avx2" in flags else "no AVX2"
    return f"{model}, {isa}"


def torch_ao_int8(model, calib, example):
    """torch.ao.quantization.quantize_fx with the x86 backend's default config (comparison only)."""
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx
    prepared = prepare_fx(model, get_default_qconfig_mapping("x86"), (example,))
    with torch.no_grad():
        for c in calib:
            prepared(c)
    return convert_fx(prepared)


def build(name: str, size: int):
    ctor = getattr(zoo, name)
    torch.manual_seed(0)
    model = ctor().eval()
    calib = [torch.randn(1, 3, size, size) for _ in range(4)]
    programs = {}
    for label, (engine, widths) in VARIANTS.items():
        q = quantfx.quantize(model, torch_profile(engine), calibration_data=calib, progress=False, **widths)
        programs[label] = quantfx.lower(q, (calib[0],), format="torchscript")
    ao = torch_ao_int8(zoo_copy(ctor), calib, calib[0])
    return model, programs, ao


def sqnr_row(model, programs, ao, size: int) -> dict:
    """SQNR against the float model of torch.ao's int8 model and of each quantfx program, on 8 inputs."""
    x = torch.randn(8, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(x)
        row = {"torch.ao": quantfx.sqnr(ref, ao(x))}
        for label, p in programs.items():
            with quantized_engine(p.engine):
                row[label] = quantfx.sqnr(ref, p(x))
    return row


def zoo_copy(ctor):
    torch.manual_seed(0)
    return ctor().eval()


def measure(fns: dict, x, runs: int) -> dict:
    """Median ms of each ``name: (fn, engine)``, each called under its quantized engine (a quantfx program's
    own; torch.ao's modules keep the packing of the engine they were converted under)."""
    times = {k: [] for k in fns}
    with torch.no_grad():
        for fn, engine in fns.values():
            with quantized_engine(engine):
                for _ in range(5):
                    fn(x)
        for _ in range(runs):
            for k, (fn, engine) in fns.items():
                with quantized_engine(engine):
                    t = time.perf_counter()
                    fn(x)
                    times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


def load() -> str:
    return "load " + " ".join(f"{v:.2f}" for v in os.getloadavg())


def op_profile(fns: dict, x, calls: int = 20) -> dict:
    """``name: {op kind: self CPU ms per call}`` from torch.profiler, each ``name: (fn, engine)`` run apart."""
    from torch.profiler import ProfilerActivity, profile
    out = {}
    with torch.no_grad():
        for k, (fn, engine) in fns.items():
            with quantized_engine(engine):
                for _ in range(5):
                    fn(x)
                with profile(activities=[ProfilerActivity.CPU]) as prof:
                    for _ in range(calls):
                        fn(x)
            kinds = collections.defaultdict(float)
            for ev in prof.key_averages():
                kinds[ev.key] += ev.self_cpu_time_total / calls / 1e3
            out[k] = kinds
    return out


def print_profile(name: str, threads: int, fns: dict, x) -> None:
    per = op_profile(fns, x)
    kinds = sorted(set().union(*per.values()), key=lambda op: -max(p.get(op, 0.0) for p in per.values()))
    print(f"\n{name}, {threads} thread(s), self CPU ms per call by op kind ({load()}):\n")
    print("| op | " + " | ".join(per) + " |")
    print("|---|" + "---|" * len(per))
    for op in kinds:
        if max(p.get(op, 0.0) for p in per.values()) >= 0.01:
            print(f"| {op} | " + " | ".join(f"{p.get(op, 0.0):.3f}" for p in per.values()) + " |")
    print("| all | " + " | ".join(f"{sum(p.values()):.3f}" for p in per.values()) + " |\n", flush=True)


def main_engines(args):
    """The TorchScript engines against torch.ao's FX flow (``--engines``)."""
    warnings.filterwarnings("ignore", category=UserWarning, module="torch")  # this script only
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    vnni = "VNNI" in cpu_name()
    print(f"CPU: {cpu_name()}; torch {torch.__version__}; quantfx programs {', '.join(VARIANTS)}; torch.ao x86 "
          f"backend config, converted under engine x86 (on this CPU {'oneDNN convolutions' if vnni else 'fbgemm'})")
    header = ("| model | threads | float ms | torch.ao int8 ms | " + " | ".join(f"quantfx {k} ms" for k in VARIANTS)
              + " | " + " | ".join(f"{k} vs float / torch.ao" for k in VARIANTS) + " | load (1, 5, 15 min) |\n|"
              + "---|" * (5 + 2 * len(VARIANTS)))
    rows = []
    if not args.profile:
        print(header)
    x = torch.randn(1, 3, args.size, args.size)
    quality = {}
    for name in args.models:
        model, programs, ao = build(name, args.size)
        quality[name] = sqnr_row(model, programs, ao, args.size)
        for threads in (1, 2):
            torch.set_num_threads(threads)
            fns = {"float": (model, "x86"), "torch.ao": (ao, "x86"),
                   **{label: (p.module, p.engine) for label, p in programs.items()}}
            if args.profile:
                print_profile(name, threads, {k: fns[k] for k in (next(iter(VARIANTS)), "torch.ao")}, x)
            ms = measure(fns, x, args.runs)
            rows.append(f"| {name} | {threads} | " + " | ".join(f"{ms[k]:.2f}" for k in fns) + " | "
                        + " | ".join(f"{ms['float'] / ms[k]:.2f}x / {ms['torch.ao'] / ms[k]:.2f}x" for k in VARIANTS)
                        + f" | {load()[5:]} |")
            if not args.profile:
                print(rows[-1], flush=True)
    if args.profile:
        print(header + "\n" + "\n".join(rows))
    print("\nSQNR against the float model, dB (8 inputs N(0, 1), the programs as timed):\n")
    print("| model | torch.ao | " + " | ".join(f"quantfx {k}" for k in VARIANTS) + " |\n|" + "---|" * (2 + len(VARIANTS)))
    for name, row in quality.items():
        print(f"| {name} | " + " | ".join(f"{v:.2f}" for v in row.values()) + " |")
    torch.set_num_threads(1)
    m50 = zoo.resnet50_like().eval()
    x50 = torch.randn(1, 3, args.size, args.size)
    q50 = quantfx.quantize(m50, "torch", calibration_data=[x50], progress=False)
    quantfx.lower(q50, (x50,), format="torchscript")  # warm-up
    times = []
    for _ in range(3):
        t = time.perf_counter()
        quantfx.lower(q50, (x50,), format="torchscript")
        times.append(time.perf_counter() - t)
    print(f"lower resnet50_like for torch, one thread: {min(times):.3f} s (best of 3; "
          f"median {statistics.median(times):.3f} s)")



# -- the .pt2 table --------------------------------------------------------------------------------------------


def vit_block():
    """A ViT-S/16-sized encoder block (tests/modern_models.ViTBlock: patch embedding, class token, attention, MLP)
    on 224 x 224 images."""
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    from tests.modern_models import ViTBlock
    torch.manual_seed(0)
    return ViTBlock(dim=384, heads=6, patch=16, image=224).eval()


def float_model(name: str):
    """``vit_block``, a quantfx.zoo model (``resnet18_like``), or a torchvision one (``resnet18``), random weights."""
    if name == "vit_block":
        return vit_block()
    import torchvision
    torch.manual_seed(0)
    if hasattr(zoo, name):
        return getattr(zoo, name)().eval()
    return getattr(torchvision.models, name)(weights=None).eval()


class _ReLU(torch.nn.Module):
    """F.relu in a module of its own: torchao's X86InductorQuantizer refuses a ReLU module called twice (a ResNet
    block's ``self.relu``: "Input partition has more than one output node"), a function call per use it takes."""

    def forward(self, x):
        return torch.nn.functional.relu(x)


def torchao_pt2e(model, calib, example):
    """torchao's PT2E flow with the x86 inductor quantizer's default (static, per-channel) config (comparison).
    Its ReLU modules become calls of F.relu first (what the quantizer needs; the float model is the same)."""
    import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as xiq
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if type(child) is torch.nn.ReLU:
                setattr(parent, child_name, _ReLU())
    quantizer = xiq.X86InductorQuantizer().set_global(xiq.get_default_x86_inductor_quantization_config())
    exported = torch.export.export(model, (example,), dynamic_shapes=({0: torch.export.Dim.AUTO},)).module()
    prepared = prepare_pt2e(exported, quantizer)
    with torch.no_grad():
        for c in calib:
            prepared(c)
    return convert_pt2e(prepared)


def compile_frozen(module):
    return torch.compile(module)  # torch._inductor.config.freezing is on (main_pt2)


_KERNEL_COUNTERS = {"qconv_unary_lower_count": "conv", "qlinear_unary_lower_count": "linear",
                    "qconv2d_binary_lower_count": "conv+add", "qlinear_binary_lower_count": "linear+add"}


def int8_kernels(fn, x) -> dict:
    """oneDNN int8 kernels inductor made when compiling ``fn`` for ``x`` (its first call), by kind (conv, conv+add
    for ``qconv2d_pointwise.binary``, ...)."""
    from torch._dynamo.utils import counters
    before = {k: counters["inductor"][k] for k in _KERNEL_COUNTERS}
    with torch.no_grad():
        fn(x)
    return {kind: counters["inductor"][k] - before[k] for k, kind in _KERNEL_COUNTERS.items()
            if counters["inductor"][k] - before[k]}


def median_ms(fns: dict, x, runs: int) -> dict:
    """Median ms of each ``name: fn`` over ``runs`` rounds, the variants interleaved in each round in an order
    shuffled per round (seeded): in a fixed order each variant always runs after the same one, and on ResNet-18 at
    batch 1, timed in the fixed order TorchScript file, .pt2, PT2E, the .pt2 came out 2 and 8 % behind PT2E (1 and
    2 threads), alternating with PT2E alone within 1 % (BENCHMARKS.md, pt2fix29)."""
    times = {k: [] for k in fns}
    order, rng = list(fns), random.Random(0)
    with torch.no_grad():
        for fn in fns.values():
            for _ in range(3):
                fn(x)
        for _ in range(runs):
            rng.shuffle(order)
            for k in order:
                t = time.perf_counter()
                fns[k](x)
                times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


def main_pt2(args):
    import tempfile
    import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer  # noqa: F401  registers the x86 passes
    torch._inductor.config.freezing = True  # global: dynamo reads it while tracing (weights become constants)
    print(f"CPU: {cpu_name()}; torch {torch.__version__}; compiled = torch.compile(inductor, freezing=True) with "
          "torchao 0.18's x86 int8 passes registered")
    print("\n| model | batch | threads | quantfx .pt2 compiled ms | torchao PT2E compiled ms | float compiled ms | "
          "quantfx TorchScript ms | .pt2 vs PT2E | .pt2 vs float | load (1, 5, 15 min) |\n|" + "---|" * 10)
    notes = []
    tmp = tempfile.mkdtemp()
    for name in args.models:
        try:
            notes += bench_pt2_model(name, args, tmp)
        except Exception as e:  # noqa: BLE001  (one model's failure is reported; the others are still measured)
            notes.append(f"{name}: failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            print(f"| {name} | failed: {notes[-1]} |", flush=True)
    print()
    for n in notes:
        print("- " + n)


def bench_pt2_model(name: str, args, tmp: str) -> list:
    """Prints the table's rows for one model; returns its notes (errors against the fake-quant model, int8
    kernels, SQNR)."""
    from quantfx.targets import torch_pt2_runtime
    notes = []
    model = float_model(name)
    size = (1, 3, args.size, args.size)
    calib = [torch.randn((4,) + size[1:], generator=torch.Generator().manual_seed(i)) for i in range(2)]
    q = quantfx.quantize(model, "torch", calibration_data=calib, progress=False)
    quantfx.export(q, f"{tmp}/{name}.pt2", (calib[0][:1],))
    quantfx.export(q, f"{tmp}/{name}.pt", (calib[0][:1],), format="torchscript")
    pt2 = torch_pt2_runtime.load(f"{tmp}/{name}.pt2")
    script = torch_pt2_runtime.load(f"{tmp}/{name}.pt")
    ao = torchao_pt2e(float_model(name), calib, calib[0])  # a dynamic batch, as quantfx's file has
    for batch in (1, 8):
        x = torch.randn((batch,) + size[1:], generator=torch.Generator().manual_seed(7))
        fns = {"pt2": compile_frozen(pt2.exported.module()), "pt2e": compile_frozen(ao),
               "float": compile_frozen(float_model(name)), "torchscript": script}
        kernels = {k: int8_kernels(fns[k], x) for k in ("pt2", "pt2e")}
        for threads in (1, 2):
            torch.set_num_threads(threads)
            ms = median_ms(fns, x, args.runs)
            print(f"| {name} | {batch} | {threads} | " + " | ".join(f"{ms[k]:.2f}" for k in fns)
                  + f" | {ms['pt2e'] / ms['pt2']:.2f}x | {ms['float'] / ms['pt2']:.2f}x | {load()[5:]} |",
                  flush=True)
        pt2._modules["compiled"] = fns["pt2"]  # verify's compiled run: the function timed above
        report = quantfx.verify(q, pt2, (x,))
        with torch.no_grad():
            sq = {k: quantfx.sqnr(model(x), fns[k](x)) for k in ("pt2", "pt2e")}
        notes.append(f"{name} batch {batch}: quantfx .pt2 eager {report.max_error_lsb:.0f} LSB, compiled "
                     f"{report.variant_error_lsb('compiled'):.0f} LSB against the fake-quant model; int8 kernels: "
                     f"quantfx {kernels['pt2']}, PT2E {kernels['pt2e']}; SQNR vs float: quantfx {sq['pt2']:.1f} dB, "
                     f"PT2E {sq['pt2e']:.1f} dB")
        print("  note: " + notes[-1], flush=True)
    return notes


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=None)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--engines", action="store_true", help="the TorchScript engines vs torch.ao's FX flow")
    parser.add_argument("--profile", action="store_true", help="--engines: op kinds of the default program and "
                        "torch.ao's")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", category=UserWarning, module="torch")  # this script only
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch")  # torch.jit's, for the .pt timings
    if args.engines:
        args.models = args.models or ["resnet18_like", "mobilenetv2_like"]
        args.runs = max(args.runs, 30)
        main_engines(args)
    else:
        args.models = args.models or ["resnet18", "mobilenet_v2", "vit_block", "resnet50"]
        main_pt2(args)

if __name__ == "__main__":
    main()
