"""torch target: latency of the lowered int8 programs against torch.ao's FX flow (prepare_fx + convert_fx, x86
backend, the comparison only: quantfx never uses it) and the float model, side by side in one run, batch 1,
for 1 and 2 threads; and the time to lower a ResNet-50-sized model.

    python tools/bench_torch.py [--models resnet18_like mobilenetv2_like] [--runs 30] [--size 224] [--profile]

The quantfx programs: the default (engine x86, W7A8: 7-bit weights, 8-bit activations on power-of-two scales,
every requantization exact, so oneDNN convolutions on VNNI CPUs and fbgemm elsewhere give the same integers),
fbgemm (W7A8, float activation scales, fbgemm on every CPU) and the onednn profile (W8A7). Each latency is the median of ``--runs`` timed calls after warm-up, the variants interleaved
round by round so that machine noise hits them alike; each row ends with the load average. Prints a Markdown
table (BENCHMARKS.md records it) and the CPU. ``--profile``: per model and thread count, torch.profiler's self
CPU time per op kind of the default program and of torch.ao's (ms per call), then the table.
"""
from __future__ import annotations

import argparse
import collections
import os
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
        programs[label] = quantfx.lower(q, (calib[0],))
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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["resnet18_like", "mobilenetv2_like"])
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--profile", action="store_true", help="op kinds of the default program and torch.ao's")
    args = parser.parse_args(argv)
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
