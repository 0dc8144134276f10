"""torch target: latency of the lowered int8 programs (engines fbgemm and onednn) against torch.ao's FX flow (prepare_fx + convert_fx, x86
backend, the comparison only: quantfx never uses it) and the float model, side by side in one run, batch 1,
for 1 and 2 threads; and the time to lower a ResNet-50-sized model.

    python tools/bench_torch.py [--models resnet18_like mobilenetv2_like] [--runs 30] [--size 224]

Each latency is the median of ``--runs`` timed calls after warm-up, the three variants interleaved round by
round so that machine noise hits them alike. Prints a Markdown table (BENCHMARKS.md records it) and the CPU.
"""
from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch

import quantfx
from quantfx import zoo
from quantfx.targets import torch_profile
from quantfx.targets.torch_quantized import quantized_engine

ENGINES = ("fbgemm", "onednn")  # quantfx's default, and oneDNN's arithmetic modelled


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
    for engine in ENGINES:
        q = quantfx.quantize(model, torch_profile(engine), calibration_data=calib, progress=False)
        programs[engine] = quantfx.lower(q, (calib[0],))
    ao = torch_ao_int8(zoo_copy(ctor), calib, calib[0])
    return model, programs, ao


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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["resnet18_like", "mobilenetv2_like"])
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--size", type=int, default=224)
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", category=UserWarning, module="torch")  # this script only
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    vnni = "VNNI" in cpu_name()
    print(f"CPU: {cpu_name()}; torch {torch.__version__}; quantfx engines {', '.join(ENGINES)}; torch.ao x86 "
          f"backend config, converted under engine x86 (on this CPU {'oneDNN convolutions' if vnni else 'fbgemm'})")
    print("| model | threads | float ms | torch.ao int8 ms | quantfx fbgemm ms | quantfx onednn ms | fbgemm vs float "
          "| fbgemm vs torch.ao | onednn vs float | onednn vs torch.ao |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    x = torch.randn(1, 3, args.size, args.size)
    for name in args.models:
        model, programs, ao = build(name, args.size)
        for threads in (1, 2):
            torch.set_num_threads(threads)
            fns = {"float": (model, "x86"), "ao": (ao, "x86"),
                   **{e: (p.module, p.engine) for e, p in programs.items()}}
            ms = measure(fns, x, args.runs)
            print(f"| {name} | {threads} | {ms['float']:.2f} | {ms['ao']:.2f} | {ms['fbgemm']:.2f} | {ms['onednn']:.2f} | "
                  + " | ".join(f"{ms['float'] / ms[e]:.2f}x | {ms['ao'] / ms[e]:.2f}x" for e in ENGINES) + " |",
                  flush=True)
    torch.set_num_threads(1)
    m50 = zoo.resnet50_like().eval()
    x50 = torch.randn(1, 3, args.size, args.size)
    q50 = quantfx.quantize(m50, "torch", calibration_data=[x50], progress=False)
    quantfx.lower(q50, (x50,))  # warm-up
    times = []
    for _ in range(3):
        t = time.perf_counter()
        quantfx.lower(q50, (x50,))
        times.append(time.perf_counter() - t)
    print(f"lower resnet50_like for torch, one thread: {min(times):.3f} s (best of 3; "
          f"median {statistics.median(times):.3f} s)")


if __name__ == "__main__":
    main()
