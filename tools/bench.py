"""Side-by-side benchmark of quantfx against Brevitas, torch.ao FX and onnxruntime's quantizer (issue 14):
compile time, scaling with depth, inference latency, accuracy on the quick start's digits CNN, and peak memory.

    python tools/bench.py [--quick] [--sections compile,scaling,inference,accuracy,memory] [--runs N] [--threads N]

Brevitas, torch.ao and onnxruntime's quantizer are benchmark-only comparisons (``pip install -e ".[bench]"``);
a comparison whose package is missing is skipped, and the script says which and why. quantfx never imports them.

What each compile timing includes (one model, the same calibration batches for every tool, wall time):
  quantfx finn   ``quantfx.quantize(model, 'finn', calibration_data=calib)`` (trace, passes, calibration)
                 + ``quantfx.export`` to a QONNX file
  Brevitas       ``preprocess_for_quantize`` + ``quantize`` + calibration (``calibration_mode``, same batches)
                 + ``export_qonnx`` to a QONNX file
  quantfx torch  ``quantfx.quantize(model, 'torch', calibration_data=calib)`` + ``quantfx.export`` (TorchScript .pt)
  torch.ao       ``prepare_fx`` + calibration (same batches) + ``convert_fx`` (in memory, no file); the
                 ``torch.jit.trace`` + save of its result is timed apart ("ao save")
Each tool is warmed up once on a small model first (imports, first-call costs), then the tools take turns per
round; the best and the median of ``--runs`` rounds are shown and ratios use the medians. Figures on this
shared machine move with the load: the load average is printed with every section.
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
sys.path.insert(0, str(ROOT / "examples"))

import torch  # noqa: E402

import quantfx  # noqa: E402
from quantfx import zoo  # noqa: E402

import baselines  # noqa: E402

SECTIONS = ("compile", "scaling", "inference", "accuracy", "memory")
COMPILE_MODELS = ("resnet18_like", "resnet50_like", "mobilenetv2_like", "densenet121_like")
COMPARISONS = {"brevitas": "Brevitas", "torch.ao": "torch.ao FX", "onnxruntime.quantization": "onnxruntime quantize_static"}


def parse_sections(text: str) -> list[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in names if s not in SECTIONS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
    return names


def available() -> dict:
    """package -> None when usable, else why not (``baselines.missing``)."""
    return {name: baselines.missing(name) for name in COMPARISONS}


def skip_lines(avail: dict) -> list[str]:
    return [f"skipped: every {COMPARISONS[name]} comparison: {why}" for name, why in avail.items() if why]


def load() -> str:
    one, five, _ = os.getloadavg()
    return f"load average {one:.2f} (1 min), {five:.2f} (5 min) on {os.cpu_count()} CPUs"


def section(title: str) -> None:
    print(f"\n## {title}  [{load()}]", flush=True)


def timed(fn, *args, **kwargs):
    t = time.perf_counter()
    out = fn(*args, **kwargs)
    return time.perf_counter() - t, out


# --------------------------------------------------------------------------------------------------- compile


def compile_quantfx(model, target: str, calib, workdir: Path) -> dict:
    t_q, q = timed(quantfx.quantize, model, target, calibration_data=calib, progress=False)
    t_e, _ = timed(quantfx.export, q, workdir / f"quantfx_{target}", example_inputs=(calib[0],))
    graph = sum(r.seconds for r in q.pass_timings)
    return {"total": t_q + t_e, "graph": graph, "calibrate": t_q - graph, "export": t_e}


def compile_brevitas(model, calib, workdir: Path) -> dict:
    t_g, bq = timed(baselines.brevitas_quantize, model)
    t_c, _ = timed(baselines.brevitas_calibrate, bq, calib)
    t_e, _ = timed(baselines.brevitas_export_qonnx, bq, calib[0], workdir / "brevitas.onnx")
    return {"total": t_g + t_c + t_e, "graph": t_g, "calibrate": t_c, "export": t_e}


def compile_torchao(model, calib, workdir: Path) -> dict:
    t_p, prepared = timed(baselines.torchao_prepare, model, calib[0])
    t_c, _ = timed(baselines._run, prepared, calib)
    t_v, converted = timed(baselines.torchao_convert, prepared)
    t = time.perf_counter()
    try:
        with torch.no_grad():
            torch.jit.save(torch.jit.trace(converted, calib[0]), str(workdir / "torchao.pt"))
        t_save = time.perf_counter() - t
    except Exception as e:  # a model torch.jit.trace cannot take: say so, the compile figure stands
        print(f"  (torch.ao result not saved: {type(e).__name__}: {e})")
        t_save = float("nan")
    return {"total": t_p + t_c + t_v, "graph": t_p + t_v, "calibrate": t_c, "export": t_save}


def compile_tools(avail: dict) -> dict:
    """The in-process compile timings; Brevitas runs in a child process (``in_child``)."""
    tools = {"quantfx finn": lambda m, c, d: compile_quantfx(m, "finn", c, d),
             "quantfx torch": lambda m, c, d: compile_quantfx(m, "torch", c, d)}
    if not avail["torch.ao"]:
        tools["torch.ao"] = compile_torchao
    return tools


def in_child(kind: str, **spec):
    """Run Brevitas work in a fresh process of this script: Brevitas's backport of torch.fx names generated
    code ``<eval_with_key>.N`` with its own counter, as torch.fx does, so once Brevitas has traced a model,
    ``torch.jit.script`` of a GraphModule made later in the same process can be handed Brevitas's source from
    linecache (seen here: quantfx's torch export of mobilenetv2_like after Brevitas quantized a model)."""
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "spec.pt"
        torch.save(dict(spec, kind=kind, threads=torch.get_num_threads()), path)
        out = subprocess.run([sys.executable, __file__, "--brevitas-child", str(path)], capture_output=True,
                             text=True)
        if out.returncode:
            raise RuntimeError(f"Brevitas child process failed ({kind}):\n{out.stderr[-3000:]}")
        return torch.load(Path(d) / "out.pt", weights_only=False)


def brevitas_child(path: str) -> None:
    spec = torch.load(path, weights_only=False)
    torch.set_num_threads(spec["threads"])
    result = None
    if spec["kind"] == "compile":
        with tempfile.TemporaryDirectory() as d:
            compile_brevitas(zoo.ResNetSmall().eval(), [torch.randn(1, 3, 32, 32)], Path(d))  # warm-up
            result = []
            for _ in range(spec["runs"]):
                gc.collect()
                result.append(compile_brevitas(spec["model"], spec["calib"], Path(d)))
    elif spec["kind"] == "ptq":
        with torch.no_grad():
            result = [baselines.brevitas_ptq(spec["model"], spec["calib"], b, b)(spec["x"]) for b in spec["bits"]]
    torch.save(result, Path(path).with_name("out.pt"))


def run_compile(models: dict, tools: dict, size: int, n_calib: int, runs: int, brevitas: bool) -> dict:
    """name -> tool -> list of per-round timing dicts; each model built once (seed 0), calibration batches of 1.
    The in-process tools take turns round by round; Brevitas's rounds follow in a child process."""
    results = {}
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        warm = zoo.ResNetSmall().eval()
        warm_calib = [torch.randn(1, 3, 32, 32)]
        for fn in tools.values():
            fn(warm, warm_calib, work)
        for name, ctor in models.items():
            torch.manual_seed(0)
            model = ctor().eval()
            before = copy.deepcopy(model.state_dict())
            gen = torch.Generator().manual_seed(1)
            calib = [torch.randn(1, 3, size, size, generator=gen) for _ in range(n_calib)]
            results[name] = {tool: [] for tool in tools}
            for _ in range(runs):
                for tool, fn in tools.items():
                    gc.collect()
                    results[name][tool].append(fn(model, calib, work))
            after = model.state_dict()
            assert all(torch.equal(before[k], after[k]) for k in before), f"{name}: a tool modified the user's model"
            if brevitas:
                results[name]["Brevitas"] = in_child("compile", model=model, calib=calib, runs=runs)
            print(f"  {name}: " + ", ".join(
                f"{t} {med(v):.2f} s ({' / '.join(f'{med(v, k):.2f}' for k in ('graph', 'calibrate', 'export'))})"
                for t, v in results[name].items()), flush=True)
    return results


def med(rows: list, key: str = "total") -> float:
    return statistics.median(r[key] for r in rows)


def print_compile(results: dict, size: int, n_calib: int, runs: int) -> None:
    print(f"input 1x3x{size}x{size}, {n_calib} calibration batches of 1, {runs} round(s), "
          f"torch threads {torch.get_num_threads()}; seconds, median of the rounds (best in brackets)")
    tools = list(next(iter(results.values())))
    print("| model | " + " | ".join(tools) + " | Brevitas / quantfx finn | torch.ao / quantfx torch |")
    print("|---|" + "---|" * (len(tools) + 2))
    for name, per_tool in results.items():
        cells = [f"{med(per_tool[t]):.2f} ({min(r['total'] for r in per_tool[t]):.2f})" for t in tools]
        ratios = []
        for other, ours in (("Brevitas", "quantfx finn"), ("torch.ao", "quantfx torch")):
            ratios.append(f"{med(per_tool[other]) / med(per_tool[ours]):.2f}x" if other in per_tool else "skipped")
        print(f"| {name} | " + " | ".join(cells) + " | " + " | ".join(ratios) + " |")
    print("\nsplit, medians in seconds: graph work (quantfx: the pass pipeline's own timings; Brevitas: preprocess + "
          "quantize; torch.ao: prepare_fx + convert_fx) / calibration (quantfx: the rest of quantize(), i.e. the "
          "model copy and calibration) / export (quantfx: lower + write; Brevitas: export_qonnx; torch.ao: "
          "jit.trace + save, not in its total)")
    print("| model | " + " | ".join(tools) + " |")
    print("|---|" + "---|" * len(tools))
    for name, per_tool in results.items():
        print(f"| {name} | " + " | ".join(
            " / ".join(f"{med(per_tool[t], k):.2f}" for k in ("graph", "calibrate", "export")) for t in tools) + " |")


def compile_section(args, avail) -> None:
    section("Compile time: quantize + export, against Brevitas and torch.ao FX")
    for line in skip_lines({k: avail[k] for k in ("brevitas", "torch.ao")}):
        print(line)
    models = {name: getattr(zoo, name) for name in args.compile_models}
    results = run_compile(models, compile_tools(avail), args.size, args.calib, args.compile_runs,
                          brevitas=not avail["brevitas"])
    print_compile(results, args.size, args.calib, args.compile_runs)


# --------------------------------------------------------------------------------------------------- scaling


def scaling_section(args, avail) -> None:
    section("Scaling: generated deep_chain(n) models")
    for line in skip_lines({k: avail[k] for k in ("brevitas", "torch.ao")}):
        print(line)
    tools = compile_tools(avail)
    names = list(tools) + ([] if avail["brevitas"] else ["Brevitas"])
    print(f"input 1x3x16x16, 1 calibration batch, {args.scaling_runs} round(s); totals as in the compile section, "
          f"median seconds; per node: total / traced fx nodes. Brevitas up to {args.scaling_baseline_max} layers. "
          "Progress lines: total (graph / calibration / export), as split in the compile section")
    print("| layers | traced nodes | " + " | ".join(f"{t} s | {t} ms/node" for t in names) + " |")
    print("|---|---|" + "---|---|" * len(names))
    rows = {}
    for n in args.layers:
        torch.manual_seed(0)
        model = zoo.deep_chain(n).eval()
        nodes = len(torch.fx.symbolic_trace(model).graph.nodes)
        base = n <= args.scaling_baseline_max  # Brevitas
        res = run_compile({"chain": lambda m=model: m}, tools, 16, 1, args.scaling_runs,
                          brevitas=base and not avail["brevitas"])
        rows[n] = {t: med(v) for t, v in res["chain"].items()}
        cells = [f"{rows[n][t]:.2f} | {rows[n][t] / nodes * 1e3:.2f}" if t in rows[n] else "not run | -"
                 for t in names]
        print(f"| {n} | {nodes} | " + " | ".join(cells) + " |", flush=True)
    first = args.layers[0]
    for t in names:
        done = [n for n in args.layers if t in rows[n]]
        if len(done) > 1:
            print(f"{t}: {done[-1]} / {first} layers: {rows[done[-1]][t] / rows[first][t]:.1f}x the time for "
                  f"{done[-1] / first:.0f}x the layers")


# ------------------------------------------------------------------------------------------------- inference


def row(what: str, threads: int, float_ms: float, ours_ms: float, other_ms, missing: str = "skipped") -> None:
    """One Markdown row of the inference table; ``other_ms`` None: the comparison was not run (``missing``)."""
    other = missing if other_ms is None else f"{other_ms:.2f}"
    vs_other = missing if other_ms is None else f"{other_ms / ours_ms:.2f}x"
    print(f"| {what} | {threads} | {float_ms:.2f} | {ours_ms:.2f} | {other} | {float_ms / ours_ms:.2f}x | {vs_other} |",
          flush=True)


def inference_section(args, avail) -> None:
    import bench_dpu
    import bench_onnx
    import bench_torch
    from bench_torch import ENGINES
    section("Inference: batch 1, ResNet-18 shape")
    for line in skip_lines({k: avail[k] for k in ("torch.ao", "onnxruntime.quantization")}):
        print(line)
    size, runs = args.size, args.latency_runs
    torch.manual_seed(0)
    model = zoo.resnet18_like().eval()
    x = torch.randn(1, 3, size, size)
    calib = [torch.randn(1, 3, size, size) for _ in range(args.calib)]
    q_onnx = quantfx.quantize(model, "onnx", calibration_data=calib, progress=False)
    q_dpu = quantfx.quantize(model, "dpu", calibration_data=calib, progress=False)
    f32 = bench_onnx.float_onnx(model, x)
    onnx_models = {"float": f32, "quantfx onnx": quantfx.lower(q_onnx, (x,))}
    if not avail["onnxruntime.quantization"]:
        with tempfile.TemporaryDirectory() as d:
            onnx_models["ort quantize_static"] = bench_onnx.ort_static(f32, [c.numpy() for c in calib], Path(d))
    # bench_torch.build: the float model, quantfx's programs (engines fbgemm, onednn) and torch.ao's x86 int8 model
    built = None if avail["torch.ao"] else bench_torch.build("resnet18_like", size)
    print(f"input 1x3x{size}x{size}; onnxruntime: median of {runs} runs, sessions in turns (bench_onnx / "
          f"bench_dpu); PyTorch: median of {runs} runs, interleaved (bench_torch); ratios: speed-up over the "
          "row's reference (>1 is faster)")
    print("| runtime | threads | float ms | quantfx ms | other int8 ms | quantfx vs float | quantfx vs other |")
    print("|---|---|---|---|---|---|---|")
    for threads in args.thread_list:
        torch.set_num_threads(threads)
        ms = bench_onnx.latencies_ms(onnx_models, x.numpy(), runs, threads)
        row("onnxruntime, onnx target (other: quantize_static)", threads, ms["float"], ms["quantfx onnx"],
            ms.get("ort quantize_static"))
        if built is not None:
            fmodel, programs, ao = built
            fns = {"float": (fmodel, "x86"), "ao": (ao, "x86"), **{e: (p.module, p.engine) for e, p in programs.items()}}
            tm = bench_torch.measure(fns, x, runs)
            for e in ENGINES:
                row(f"PyTorch, torch target engine {e} (other: torch.ao x86)", threads, tm["float"], tm[e], tm["ao"])
        sessions, _, _ = bench_dpu.forms(model, q_dpu, x, threads)
        dm = bench_dpu.median_ms(sessions, x.numpy(), runs)
        for form in ("dpu (verification form)", "dpu fast form"):
            row(f"onnxruntime, {form} (no other)", threads, dm["float"], dm[form], None, missing="-")
    torch.set_num_threads(args.threads)


# -------------------------------------------------------------------------------------------------- accuracy


def accuracy_section(args, avail) -> None:
    import quickstart as qs
    from quantfx.export import BACKENDS
    section("Accuracy: the quick start's digits CNN")
    for line in skip_lines({k: avail[k] for k in ("brevitas", "torch.ao")}):
        print(line)
    x_tr, y_tr, x_te, y_te = qs.load_digits(seed=0)
    torch.manual_seed(0)
    model = qs.train(qs.DigitsNet(), x_tr, y_tr, args.epochs)
    calib = [x_tr[i:i + 64] for i in range(0, 512, 64)]
    with torch.no_grad():
        ref = model(x_te)
    print(f"scikit-learn digits, quickstart.load_digits(seed=0): 80/20 split by a seeded permutation, "
          f"{len(x_tr)} train / {len(x_te)} test images; DigitsNet trained {args.epochs} epochs (seed 0); calibration: "
          f"the first 512 training images in 8 batches of 64, the same for every tool. float {qs.accuracy(ref, y_te):.2f}%")
    print("quantfx: each target's file run in its own runtime (qonnx, onnxruntime, PyTorch), its defaults but the "
          "widths (weights, activations and the input at W/A bits; at 8 bits the target's own defaults, e.g. onnx "
          "7-bit weight magnitudes, torch W7A8); torch.ao: int8 kernels at W8A8, fake-quant below; "
          "Brevitas: its fake-quant model (tools/baselines.py)")
    print("| tool | " + " | ".join(f"W{b}A{b} acc % | W{b}A{b} SQNR dB" for b in args.bits) + " |")
    print("|---|" + "---|---|" * len(args.bits))
    work = Path(tempfile.mkdtemp(prefix="bench_digits_"))

    def quantfx_logits(target):
        def run(b):
            widths = {} if b == 8 else dict(weight_bit_width=b, act_bit_width=b, input_bit_width=b)
            return qs.quantize_and_run(model, target, calib, x_te, work / f"digits_{target}_{b}", progress=False,
                                       **widths)[4]
        return run

    entries = [(f"quantfx {t}", quantfx_logits(t)) for t in sorted(BACKENDS)]
    if not avail["torch.ao"]:
        entries.append(("torch.ao FX PTQ", lambda b: baselines.torchao_ptq(model, calib, b, b)(x_te)))
    if not avail["brevitas"]:  # in a child process (in_child says why)
        brevitas_logits = dict(zip(args.bits, in_child("ptq", model=model, calib=calib, x=x_te, bits=args.bits)))
        entries.append(("Brevitas PTQ", brevitas_logits.__getitem__))
    notes = []
    for label, logits in entries:
        cells = []
        for b in args.bits:
            try:
                with torch.no_grad():
                    out = torch.as_tensor(logits(b)).float()
            except quantfx.QuantFXError as e:
                notes.append(f"{label} W{b}A{b}: not available: {str(e).splitlines()[0]}")
                cells.append("n/a | n/a")
                continue
            cells.append(f"{qs.accuracy(out, y_te):.2f} | {quantfx.sqnr(ref, out):.2f}")
        print(f"| {label} | " + " | ".join(cells) + " |", flush=True)
    shutil.rmtree(work, ignore_errors=True)
    for note in notes:
        print(note)


# ---------------------------------------------------------------------------------------------------- memory


def rss_now() -> int:
    """The process's current resident set size in bytes."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss() -> int:
    """The process's RSS high-water mark (VmHWM, the figure getrusage's ru_maxrss reports for a process of its
    own; ru_maxrss itself starts at the parent's RSS in a process made by fork + exec on Linux)."""
    with open("/proc/self/status") as f:
        kb = next(int(ln.split()[1]) for ln in f if ln.startswith("VmHWM:"))
    return kb * 1024


def reset_peak_rss() -> bool:
    """Set the high-water mark to the current RSS (Linux >= 4.0: ``5 > /proc/self/clear_refs``)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def memory_child(step: str, path: str, size: int) -> None:
    """In a fresh process: one step on resnet50_like, peak Python allocations (tracemalloc) and the RSS
    high-water mark, reset just before the step, against the RSS then; JSON on stdout."""
    import tracemalloc
    torch.set_num_threads(1)
    torch.manual_seed(0)
    x = torch.randn(1, 3, size, size)
    if step == "quantize":
        subject = zoo.resnet50_like().eval()
    else:
        subject = torch.load(path, weights_only=False)
    gc.collect()
    reset = reset_peak_rss()
    rss0, hw0 = rss_now(), peak_rss()
    tracemalloc.start()
    if step == "quantize":
        quantfx.quantize(subject, "finn", calibration_data=[x], progress=False)
    else:
        quantfx.export(subject, Path(path).with_suffix(""), example_inputs=(x,))
    _, py_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    print(json.dumps({"rss_before": rss0, "hw_before": hw0, "hw_after": peak_rss(), "py_peak": py_peak,
                      "reset": reset}))


def memory_section(args, avail) -> None:
    section("Peak memory: quantize() and export() of resnet50_like (finn)")
    torch.manual_seed(0)
    model = zoo.resnet50_like().eval()
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    buffer_bytes = sum(b.numel() * b.element_size() for b in model.buffers())
    print(f"parameters {param_bytes / 2**20:.1f} MiB ({sum(p.numel() for p in model.parameters()):,} float32), "
          f"buffers {buffer_bytes / 2**20:.1f} MiB; input 1x3x{args.size}x{args.size}, 1 calibration batch")
    print("each step in a fresh Python process: 'Python peak' = tracemalloc's peak of Python-level allocations "
          "during the step (tensor storage is not a Python allocation, so it is not in it); 'RSS peak' = the "
          "process's RSS high-water mark (VmHWM, reset to the current RSS just before the step) minus the RSS "
          "then: what the step added at its peak (export: the process first loads the quantized model)")
    with tempfile.TemporaryDirectory() as d:
        qpath = Path(d) / "q50.pt"
        q = quantfx.quantize(model, "finn", calibration_data=[torch.randn(1, 3, args.size, args.size)], progress=False)
        torch.save(q, qpath)
        del q
        print("| step | Python peak MiB | x params | RSS peak above start MiB | x params | note |")
        print("|---|---|---|---|---|---|")
        for step in ("quantize", "export"):
            out = subprocess.run([sys.executable, __file__, "--memory-child", step, str(qpath), "--size",
                                  str(args.size)], capture_output=True, text=True, check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            rss = r["hw_after"] - r["rss_before"]
            note = ("" if r["reset"] else "could not reset the high-water mark: an upper bound that includes the "
                    "model's construction or load")
            print(f"| {step} | {r['py_peak'] / 2**20:.1f} | {r['py_peak'] / param_bytes:.2f} | {rss / 2**20:.1f} | "
                  f"{rss / param_bytes:.2f} | {note} |", flush=True)


# ------------------------------------------------------------------------------------------------------ main


def settings(args) -> None:
    """Fill in the per-section sizes from --quick and --runs."""
    q = args.quick
    args.size = args.size or (112 if q else 224)
    args.calib = 2 if q else 4
    args.compile_runs = args.runs or (1 if q else 3)
    args.scaling_runs = args.runs or 1
    args.layers = (100, 1000) if q else (100, 1000, 5000)  # 5000 layers: minutes per tool here
    args.compile_models = COMPILE_MODELS[::2] if q else COMPILE_MODELS  # quick: resnet18_like, mobilenetv2_like
    args.scaling_baseline_max = 100 if q else 1000  # Brevitas: about a minute at 100 layers here
    args.latency_runs = args.runs or (10 if q else 40)
    args.thread_list = (1, 2)
    args.epochs = 15
    args.bits = (8, 4, 3)


def header(args, avail) -> None:
    import bench_torch
    import onnxruntime
    versions = [f"torch {torch.__version__}", f"onnxruntime {onnxruntime.__version__}"]
    if not avail["brevitas"]:
        import brevitas
        versions.append(f"brevitas {brevitas.__version__}")
    print(f"# quantfx side-by-side benchmark ({'--quick' if args.quick else 'full'} run, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})")
    print(f"CPU: {bench_torch.cpu_name()}; {', '.join(versions)}; torch threads {args.threads} outside the "
          f"inference section; {load()}")
    for line in skip_lines(avail):
        print(line)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="2 of the 4 compile models, 1 round, 112x112 inputs, scaling to 1000 layers (Brevitas: 100), 10 latency "
                             "runs")
    parser.add_argument("--sections", type=parse_sections, default=list(SECTIONS),
                        help=f"comma-separated, from {','.join(SECTIONS)} (default: all)")
    parser.add_argument("--runs", type=int, default=None,
                        help="rounds per compile/scaling timing and runs per latency (default: by --quick)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for the compile-time sections")
    parser.add_argument("--size", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--memory-child", nargs=2, metavar=("STEP", "PATH"), help=argparse.SUPPRESS)
    parser.add_argument("--brevitas-child", metavar="PATH", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", category=UserWarning)  # this script only: notices of the compared libraries
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    if args.brevitas_child:
        brevitas_child(args.brevitas_child)
        return 0
    if args.memory_child:
        memory_child(*args.memory_child, args.size or 224)
        return 0
    settings(args)
    torch.set_num_threads(args.threads)
    avail = available()
    header(args, avail)
    run = {"compile": compile_section, "scaling": scaling_section, "inference": inference_section,
           "accuracy": accuracy_section, "memory": memory_section}
    for name in args.sections:
        t = time.perf_counter()
        run[name](args, avail)
        print(f"({name}: {time.perf_counter() - t:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
