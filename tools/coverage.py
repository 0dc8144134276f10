"""Coverage of the timm and Hugging Face transformers catalogues: quantfx on every target beside torch.ao's FX
flow and torchao's PT2E flow, model by model.

    python tools/coverage.py --jobs 1 --timeout 900 --out coverage.jsonl --report coverage.md
    python tools/coverage.py --families resnet vit --targets onnx torch      # a subset
    python tools/coverage.py --models timm:resnet18 transformers:bert --limit 5
    python tools/coverage.py --report-only --out coverage.jsonl --report coverage.md

For each model (random weights, small input where the model allows; see SAMPLE and TRANSFORMERS below) and
each flow, one JSON line: status ``ok`` / ``refused`` (a quantfx.QuantFXError, with its message) / ``failed``
(anything else: exception type and first line, or a timeout or a crash of the child process), the SQNR in dB
of the 8-bit model's output against float on a held-out batch, quantfx.verify's max error in LSBs of the
exported artefact in its own runtime, and the time to quantize (trace + passes + calibration; for the anchors
prepare + calibration + convert).

Flows: quantfx targets ``finn``, ``onnx``, ``torch``, ``dpu`` (quantize at the target's 8-bit default, lower,
verify); anchors ``fx`` (torch.ao ``prepare_fx``/``convert_fx`` with ``get_default_qconfig_mapping('x86')``,
tools/baselines.py) and ``pt2e`` (torchao 0.18: ``torch.export`` -> ``prepare_pt2e`` with
``X86InductorQuantizer`` and its default config -> ``convert_pt2e``). The anchors are benchmark-only (``pip
install -e ".[bench]"``); quantfx and its tests never import them.

A model whose float output is identically zero (a zero-initialised classifier) gets its classifier
re-initialised with N(0, 0.02) weights before any flow runs; the record's ``compare`` says so.

Every model runs in a child process (``--timeout`` seconds in all; each flow also has ``--flow-timeout``), so a
hang or a crash costs one model; results are appended to ``--out`` as they come, and a run started again skips
the (model, flow) pairs already there (``--retry`` runs the failed ones again).
"""
from __future__ import annotations

import argparse
import json
import math
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

TARGETS = ("finn", "onnx", "torch", "dpu")
ANCHORS = ("fx", "pt2e")
FLOWS = TARGETS + ANCHORS
GOOD_DB = 10.0  # an anchor "quantizes" a model when its SQNR reaches this

# timm: family -> architectures (small variants). Input: SMALL_INPUT x SMALL_INPUT where the model runs at it
# (transformers get img_size=SMALL_INPUT), else the model's own pretrained_cfg input size.
SMALL_INPUT = 64
SAMPLE = {
    "resnet": ["resnet10t", "resnet14t", "resnet18", "resnet18d", "resnet26", "resnet26t", "resnet34", "resnet50",
               "resnetv2_50", "ecaresnet26t", "skresnet18", "seresnet18"],
    "resnext": ["resnext26ts", "resnext50_32x4d", "seresnext26d_32x4d", "bat_resnext26ts"],
    "res2net": ["res2net50_14w_8s", "res2net50_48w_2s", "res2next50"],
    "resnest": ["resnest14d"],
    "regnet": ["regnetx_002", "regnetx_004", "regnetx_006", "regnety_002", "regnety_004", "regnetz_005"],
    "efficientnet": ["efficientnet_b0", "efficientnet_lite0", "efficientnet_es", "efficientnet_b0_gn",
                     "tf_efficientnet_b0", "tf_efficientnetv2_b0", "efficientnetv2_rw_t"],
    "mobilenetv2": ["mobilenetv2_035", "mobilenetv2_050", "mobilenetv2_100"],
    "mobilenetv3": ["mobilenetv3_small_050", "mobilenetv3_small_100", "mobilenetv3_large_075",
                    "mobilenetv3_large_100", "tf_mobilenetv3_small_minimal_100"],
    "mobilenetv4": ["mobilenetv4_conv_small_035", "mobilenetv4_conv_small", "mobilenetv4_conv_medium",
                    "mobilenetv4_hybrid_medium"],
    "nas": ["mnasnet_small", "mnasnet_050", "semnasnet_050", "spnasnet_100", "fbnetc_100", "fbnetv3_b",
            "tinynet_e", "tinynet_d", "hardcorenas_a"],
    "ghostnet": ["ghostnet_050", "ghostnetv2_100", "ghostnetv3_050", "repghostnet_050"],
    "repvgg": ["repvgg_a0", "repvgg_b0", "mobileone_s0"],
    "mixnet": ["mixnet_s", "mixnet_m"],
    "lcnet": ["lcnet_035", "lcnet_050", "lcnet_100"],
    "rexnet": ["rexnet_100", "rexnetr_100"],
    "cspnet": ["cspresnet50", "cspresnext50", "cspdarknet53", "cs3darknet_focus_s", "cs3darknet_s", "darknet17"],
    "xception": ["xception41", "xception41p", "legacy_xception"],
    "fastvit": ["fastvit_t8", "fastvit_t12", "fastvit_sa12", "fastvit_mci0"],
    "convnext": ["convnext_atto", "convnext_femto", "convnext_pico", "convnext_nano", "convnextv2_atto"],
    "vit": ["vit_tiny_patch16_224", "vit_small_patch16_224", "vit_small_patch32_224", "vit_tiny_r_s16_p8_224",
            "vit_base_patch32_224", "vit_srelpos_small_patch16_224", "vit_relpos_small_patch16_224",
            "vit_wee_patch16_reg1_gap_256"],
    "deit": ["deit_tiny_patch16_224", "deit_small_patch16_224", "deit_tiny_distilled_patch16_224",
             "deit3_small_patch16_224"],
    "swin": ["swin_tiny_patch4_window7_224", "swinv2_cr_tiny_224", "swinv2_tiny_window8_256", "swin_s3_tiny_224"],
    "levit": ["levit_128s", "levit_128", "levit_conv_128s"],
    "efficientformer": ["efficientformer_l1", "efficientformerv2_s0"],
    "efficientvit": ["efficientvit_b0", "efficientvit_m0"],
    "hrnet": ["hrnet_w18_small", "hrnet_w18_small_v2"],
    "edgenext": ["edgenext_xx_small", "edgenext_x_small"],
    "mobilevit": ["mobilevit_xxs", "mobilevit_xs", "mobilevitv2_050"],
    "dla": ["dla34", "dla46_c", "dla46x_c", "dla60x_c"],
    "densenet": ["densenet121", "densenetblur121d"],
    "inception": ["inception_v3", "inception_next_atto"],
    "dpn": ["dpn48b", "dpn68"],
    "selecsls": ["selecsls42b"],
    "nfnet": ["nfnet_l0", "eca_nfnet_l0", "nf_regnet_b0", "nf_resnet26"],
    "coat": ["coat_lite_tiny", "coat_tiny"],
    "maxvit": ["coatnet_nano_rw_224", "maxvit_rmlp_pico_rw_256"],
    "pit": ["pit_ti_224", "pit_xs_224", "pit_ti_distilled_224"],
    "tnt": ["tnt_s_patch16_224"],
    "gernet": ["gernet_s"],
    "tresnet": ["tresnet_m"],
    "poolformer": ["poolformer_s12", "poolformerv2_s12"],
    "crossvit": ["crossvit_tiny_240", "crossvit_9_240"],
    "cait": ["cait_xxs24_224"],
    "xcit": ["xcit_nano_12_p16_224"],
    "twins": ["twins_pcpvt_small", "twins_svt_small"],
    "pvt": ["pvt_v2_b0"],
    "tiny_vit": ["tiny_vit_5m_224"],
    "gcvit": ["gcvit_xxtiny"],
    "nest": ["nest_tiny"],
    "hgnet": ["hgnet_tiny", "hgnetv2_b0"],
    "vovnet": ["ese_vovnet19b_dw", "ese_vovnet19b_slim"],
    "byobnet": ["botnet26t_256", "halonet26t", "lambda_resnet26t"],
    "starnet": ["starnet_s1", "starnet_s050"],
    "rdnet": ["rdnet_tiny"],
    "convit": ["convit_tiny"],
    "beit": ["beit_base_patch16_224"],
    "eva": ["eva02_tiny_patch14_224"],
    "vgg": ["vgg11", "vgg11_bn"],
    "visformer": ["visformer_tiny"],
    "sequencer": ["sequencer2d_s"],
    "mlp": ["resmlp_12_224", "gmlp_ti16_224", "mixer_s32_224"],
    "mambaout": ["mambaout_femto"],
    "fasternet": ["fasternet_t0"],
    "shvit": ["shvit_s1"],
    "repvit": ["repvit_m0_9"],
    "focalnet": ["focalnet_tiny_srf"],
    "davit": ["davit_tiny"],
    "mvitv2": ["mvitv2_tiny"],
    "hiera": ["hiera_tiny_224"],
    "nextvit": ["nextvit_small"],
    "volo": ["volo_d1_224"],
}


def _bert(t):
    return t.BertForSequenceClassification(t.BertConfig(**_TEXT, num_labels=4))


_TEXT = dict(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
             max_position_embeddings=64)
_VISION = dict(image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
               intermediate_size=128, num_labels=10)
_AUDIO = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, num_labels=4)

# transformers: name -> (family, builder(transformers) -> model, input (shape, dtype name)). Small configs,
# random weights, wrapped by quantfx.model_specs.Logits to return the logits.
TRANSFORMERS = {
    "bert": ("text", _bert, ((2, 16), "long")),
    "distilbert": ("text", lambda t: t.DistilBertForSequenceClassification(t.DistilBertConfig(
        vocab_size=1000, dim=64, n_layers=2, n_heads=2, hidden_dim=128, max_position_embeddings=64, num_labels=4)),
        ((2, 16), "long")),
    "roberta": ("text", lambda t: t.RobertaForSequenceClassification(t.RobertaConfig(
        **dict(_TEXT, max_position_embeddings=66), num_labels=4)), ((2, 16), "long")),
    "albert": ("text", lambda t: t.AlbertForSequenceClassification(t.AlbertConfig(
        **_TEXT, embedding_size=32, num_labels=4)), ((2, 16), "long")),
    "electra": ("text", lambda t: t.ElectraForSequenceClassification(t.ElectraConfig(
        **_TEXT, embedding_size=32, num_labels=4)), ((2, 16), "long")),
    "gpt2": ("text", lambda t: t.GPT2LMHeadModel(t.GPT2Config(
        vocab_size=1000, n_embd=64, n_layer=2, n_head=2, n_positions=64, use_cache=False, bos_token_id=0,
        eos_token_id=0)), ((2, 16), "long")),
    "vit": ("vision", lambda t: t.ViTForImageClassification(t.ViTConfig(**_VISION)), ((2, 3, 32, 32), "float")),
    "deit": ("vision", lambda t: t.DeiTForImageClassification(t.DeiTConfig(**_VISION)), ((2, 3, 32, 32), "float")),
    "swin": ("vision", lambda t: t.SwinForImageClassification(t.SwinConfig(
        image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[1, 2], window_size=4, num_labels=10)),
        ((2, 3, 32, 32), "float")),
    "convnext": ("vision", lambda t: t.ConvNextForImageClassification(t.ConvNextConfig(
        num_stages=2, hidden_sizes=[16, 32], depths=[1, 1], num_labels=10)), ((2, 3, 32, 32), "float")),
    "resnet": ("vision", lambda t: t.ResNetForImageClassification(t.ResNetConfig(
        embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], layer_type="basic", num_labels=10)),
        ((2, 3, 32, 32), "float")),
    "mobilevit": ("vision", lambda t: t.MobileViTForImageClassification(t.MobileViTConfig(
        image_size=64, num_labels=10)), ((2, 3, 64, 64), "float")),
    "wav2vec2": ("audio", lambda t: t.Wav2Vec2ForSequenceClassification(t.Wav2Vec2Config(
        **_AUDIO, conv_dim=(16, 16), conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=2)), ((2, 1600), "float")),
    "whisper_encoder": ("audio", lambda t: t.WhisperForAudioClassification(t.WhisperConfig(
        d_model=32, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=64, decoder_layers=1,
        decoder_attention_heads=2, decoder_ffn_dim=64, num_mel_bins=16, max_source_positions=32, num_labels=4)),
        ((2, 16, 64), "float")),
    "ast": ("audio", lambda t: t.ASTForAudioClassification(t.ASTConfig(
        **_AUDIO, patch_size=16, frequency_stride=10, time_stride=10, max_length=64, num_mel_bins=32)),
        ((2, 64, 32), "float")),
}


def all_models() -> list:
    """(model id, family) of the whole sample, families interleaved (a partial run covers every family)."""
    queues = [[(f"timm:{n}", fam) for n in names] for fam, names in SAMPLE.items()]
    queues += [[(f"transformers:{n}", f"hf-{fam}") for n, (fam, _, _) in TRANSFORMERS.items()
                if fam == kind] for kind in ("text", "vision", "audio")]
    out = []
    while any(queues):
        for q in queues:
            if q:
                out.append(q.pop(0))
    return out


# ------------------------------------------------------------------------------------------------ the child


class FlowTimeout(Exception):
    pass


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else ""


def build(model_id: str, size: int):
    """(model, example input batch of 2 at ``size`` or the model's own size, a note on the input)."""
    import torch
    kind, _, name = model_id.partition(":")
    torch.manual_seed(0)
    if kind == "transformers":
        import transformers
        from quantfx.model_specs import Logits
        _, builder, (shape, dtype) = TRANSFORMERS[name]
        model = Logits(builder(transformers)).eval()
        return model, shape, dtype
    import timm
    native = timm.models.get_pretrained_cfg(name)
    native = tuple(native.input_size) if native is not None else (3, 224, 224)
    for s in (size, native[-1]):
        torch.manual_seed(0)
        try:
            model = timm.create_model(name, pretrained=False, img_size=s)
        except TypeError:
            model = timm.create_model(name, pretrained=False)
        model.eval()
        shape = (2, native[0], s, s)
        try:
            with torch.no_grad():
                model(torch.randn(shape))
            return model, shape, "float"
        except Exception:
            if s == native[-1]:
                raise
    raise AssertionError("unreachable")


def inputs(shape, dtype, seed):
    import torch
    g = torch.Generator().manual_seed(seed)
    if dtype == "long":
        return torch.randint(1, 1000, shape, generator=g)
    return torch.randn(shape, generator=g)


def _reinit_head_if_zero(model, x) -> str:
    """Give a zero-initialised classifier random weights (module docstring); returns what is compared."""
    import torch
    with torch.no_grad():
        if model(x).abs().max() > 0:
            return "logits"
        head = model.get_classifier() if hasattr(model, "get_classifier") else None
        if not isinstance(head, torch.nn.Linear):
            head = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
        g = torch.Generator().manual_seed(1)
        head.weight.copy_(torch.randn(head.weight.shape, generator=g) * 0.02)
        if model(x).abs().max() == 0:
            return "logits (identically zero even after re-initialising the classifier: degenerate)"
        return "logits, zero-initialised classifier re-initialised N(0, 0.02)"


def run_flow(flow, model, calib, x, ref):
    """One flow on ``model``: a dict of status, sqnr_db, lsb, quantize_s (and error on failure)."""
    import torch
    import quantfx
    t0 = time.perf_counter()
    if flow in TARGETS:
        q = quantfx.quantize(model, flow, example_inputs=(calib[0],), calibration_data=calib, progress=False)
        quantize_s = time.perf_counter() - t0
        artefact = quantfx.lower(q, (x,))
        report = quantfx.verify(q, artefact, (x,))
        with torch.no_grad():
            got = q(x)
        return dict(sqnr_db=quantfx.sqnr(ref, got), lsb=report.max_error_lsb, quantize_s=quantize_s)
    if flow == "fx":
        import baselines
        torch.backends.quantized.engine = "x86"
        prepared = baselines.torchao_prepare(model, calib[0])
        with torch.no_grad():
            for b in calib:
                prepared(b)
        qm = baselines.torchao_convert(prepared)
    else:
        import baselines
        qm = baselines.pt2e_ptq(model, calib)
    quantize_s = time.perf_counter() - t0
    with torch.no_grad():
        got = qm(x)
    return dict(sqnr_db=quantfx.sqnr(ref, got), lsb=None, quantize_s=quantize_s)


def child(args) -> int:
    """Run the flows of one model, appending one JSON line per flow to args.out."""
    import warnings
    warnings.simplefilter("ignore")
    import torch
    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    model_id, family = args.child, args.family
    base = dict(model=model_id, family=family)
    try:
        model, shape, dtype = build(model_id, args.size)
        calib = [inputs(shape, dtype, seed) for seed in range(args.calib_batches)]
        x = inputs(shape, dtype, 1000)
        compare = _reinit_head_if_zero(model, x)
        with torch.no_grad():
            ref = model(x)
        before = {k: v.clone() for k, v in model.state_dict().items()}
    except Exception as e:
        for flow in args.flows:
            _append(args.out, dict(base, flow=flow, status="failed", stage="build", error_type=type(e).__name__,
                                   error=_first_line(e)))
        return 0
    base.update(input_shape=list(shape), input_dtype=dtype, compare=compare,
                params=sum(p.numel() for p in model.parameters()))

    def alarm(signum, frame):
        raise FlowTimeout(f"flow took more than {args.flow_timeout} s")

    signal.signal(signal.SIGALRM, alarm)
    import quantfx
    for flow in args.flows:
        record = dict(base, flow=flow)
        signal.alarm(args.flow_timeout)
        try:
            record.update(status="ok", **run_flow(flow, model, calib, x, ref))
        except quantfx.QuantFXError as e:
            record.update(status="refused", error_type=type(e).__name__, error=_first_line(e))
        except BaseException as e:  # noqa: BLE001 -- a failure of any kind is a result here
            if isinstance(e, KeyboardInterrupt):
                raise
            record.update(status="failed", error_type=type(e).__name__, error=_first_line(e))
        finally:
            signal.alarm(0)
        after = model.state_dict()
        if any(not torch.equal(before[k], after[k]) for k in before) or set(before) != set(after):
            record["model_modified"] = True
            model.load_state_dict(before)
        _append(args.out, record)
    return 0


_LOCK = threading.Lock()


def _append(path, record) -> None:
    line = json.dumps(record, default=float) + "\n"
    with _LOCK, open(path, "a") as f:
        import fcntl
        fcntl.flock(f, fcntl.LOCK_EX)
        f.write(line)
        f.flush()


# ----------------------------------------------------------------------------------------------- the parent


def load(path) -> list:
    if not Path(path).is_file():
        return []
    out = []
    for line in Path(path).read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut short by a kill: run again
            continue
    return out


def latest(records) -> dict:
    """(model, flow) -> its last record."""
    return {(r["model"], r["flow"]): r for r in records}


def select(args) -> list:
    models = all_models()
    if args.families:
        models = [m for m in models if m[1] in args.families or m[1].removeprefix("hf-") in args.families]
    if args.models:
        wanted = set(args.models)
        known = {m for m, _ in models} | {m.partition(":")[2] for m, _ in models}
        missing = [m for m in wanted if m not in known]
        extra = [(f"timm:{m}" if ":" not in m else m, "other") for m in missing]
        models = [m for m in models if m[0] in wanted or m[0].partition(":")[2] in wanted] + extra
    return models[:args.limit] if args.limit else models


def _counts(path, model_id) -> dict:
    counts = defaultdict(int)
    for r in load(path):
        if r["model"] == model_id:
            counts[r["flow"]] += 1
    return counts


def run_model(args, model_id, family, flows) -> None:
    cmd = [sys.executable, __file__, "--child", model_id, "--family", family, "--out", args.out,
           "--flows", *flows, "--size", str(args.size), "--calib-batches", str(args.calib_batches),
           "--flow-timeout", str(args.flow_timeout), "--threads", str(args.threads)]
    start, before = time.perf_counter(), _counts(args.out, model_id)
    try:
        proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                              timeout=args.timeout)
        if proc.returncode < 0:
            why = ("Crash", f"child process died: {signal.Signals(-proc.returncode).name}")
        else:
            tail = (proc.stderr or "").strip().splitlines()[-1:]
            why = ("Crash", f"child process exited {proc.returncode} without a result: {' '.join(tail)}")
    except subprocess.TimeoutExpired:
        why = ("Timeout", f"model timed out after {args.timeout} s (all flows)")
    after = _counts(args.out, model_id)
    for flow in flows:
        if after[flow] <= before[flow]:  # the child wrote nothing for this flow: it hung or crashed in it
            _append(args.out, dict(model=model_id, family=family, flow=flow, status="failed", error_type=why[0],
                                   error=why[1][:300]))
    done = latest(load(args.out))
    print(f"{time.strftime('%H:%M:%S')} {model_id:45s} {time.perf_counter() - start:6.0f} s  "
          + " ".join(f"{f}={_cell(done.get((model_id, f)))}" for f in flows), flush=True)


def run(args) -> None:
    todo = []
    done = latest(load(args.out))
    for model_id, family in select(args):
        flows = [f for f in args.targets if (model_id, f) not in done
                 or (args.retry and done[(model_id, f)]["status"] == "failed")]
        if flows:
            todo.append((model_id, family, flows))
    print(f"{len(todo)} models to run ({sum(len(t[2]) for t in todo)} model-flows), {args.jobs} at a time; "
          f"results in {args.out}", flush=True)
    with ThreadPoolExecutor(args.jobs) as pool:
        for f in [pool.submit(run_model, args, *t) for t in todo]:
            f.result()


# ----------------------------------------------------------------------------------------------- the report


def _cell(r) -> str:
    if r is None:
        return "·"
    if r["status"] == "ok":
        db = r["sqnr_db"]
        text = "inf" if db == math.inf else f"{db:.1f}"
        if r.get("lsb") is not None and r["lsb"] > 0:
            text += f" ({r['lsb']:.3g} LSB)"
        return text
    return "refused" if r["status"] == "refused" else "FAIL"


def _good(r) -> bool:
    return r is not None and r["status"] == "ok" and r["sqnr_db"] >= GOOD_DB


def failure_class(r) -> str:
    """A failure's type and message with names and numbers blanked, to count failures by kind."""
    msg = re.sub(r"'[^']*'|\"[^\"]*\"|`[^`]*`", "'…'", r.get("error", ""))
    msg = re.sub(r" at /\S+\.py:\d+.*", "", msg)  # a traceback's file and line: the class is the message
    msg = re.sub(r"\b(at|of) node \S+", r"\1 node …", msg)
    msg = re.sub(r"[\w.]+ \((\w+)\) would run", r"… (\1) would run", msg)  # the layer's name, keep its op
    msg = re.sub(r"\d+(\.\d+)?", "N", msg)
    return f"{r.get('error_type', '?')}: {msg[:140]}"


def report(records, targets) -> str:
    by = latest(records)
    models = list(dict.fromkeys(r["model"] for r in records))
    family = {r["model"]: r["family"] for r in records}
    info = {r["model"]: r for r in records if "input_shape" in r}
    lines = ["| model | family | input | " + " | ".join(targets) + " |",
             "|---|---|---|" + "---|" * len(targets)]
    for m in models:
        shape = "×".join(map(str, info[m]["input_shape"])) if m in info else "-"
        note = " ⁰" if m in info and "re-initialised" in info[m]["compare"] else ""
        lines.append(f"| {m}{note} | {family[m]} | {shape} | " + " | ".join(_cell(by.get((m, t))) for t in targets)
                     + " |")
    lines.append("")
    lines.append("Cells: SQNR in dB of the 8-bit model against float (with quantfx.verify's max error when not "
                 "0 LSB); refused = a quantfx.QuantFXError; FAIL = any other exception, a timeout or a crash; "
                 "· = not run. ⁰ = zero-initialised classifier re-initialised N(0, 0.02) before every flow.")
    lines += ["", summary(records, targets), "", families(records, targets), "", failures(records, targets)]
    return "\n".join(lines)


def summary(records, targets) -> str:
    by = latest(records)
    models = list(dict.fromkeys(r["model"] for r in records))
    anchors_good = [m for m in models if _good(by.get((m, "fx"))) or _good(by.get((m, "pt2e")))]
    out = [f"Totals over {len(models)} models ({sum(m.startswith('timm:') for m in models)} timm, "
           f"{sum(m.startswith('transformers:') for m in models)} transformers); anchors (fx or pt2e) at ≥ "
           f"{GOOD_DB:.0f} dB on {len(anchors_good)}.", "",
           "| flow | ok | refused | failed | ok of the anchors' ≥10 dB | median SQNR | median of the better anchor "
           "(same models) | 0 LSB files | median quantize s |", "|---|---|---|---|---|---|---|---|---|"]
    for t in targets:
        rs = [by[(m, t)] for m in models if (m, t) in by]
        ok = [r for r in rs if r["status"] == "ok"]
        cover = sum(1 for m in anchors_good if (m, t) in by and by[(m, t)]["status"] == "ok")
        pairs = []
        for r in ok:
            anchor = [by[(r["model"], a)]["sqnr_db"] for a in ANCHORS
                      if (r["model"], a) in by and by[(r["model"], a)]["status"] == "ok"]
            if anchor:
                pairs.append((r["sqnr_db"], max(anchor)))
        med = f"{statistics.median(r['sqnr_db'] for r in ok):.1f}" if ok else "-"
        vs = (f"{statistics.median(p[0] for p in pairs):.1f} vs {statistics.median(p[1] for p in pairs):.1f} "
              f"(n={len(pairs)})" if pairs and t in TARGETS else "-")
        zero = sum(1 for r in ok if r.get("lsb") == 0) if t in TARGETS else "-"
        qs = f"{statistics.median(r['quantize_s'] for r in ok):.1f}" if ok else "-"
        out.append(f"| {t} | {len(ok)} | {sum(r['status'] == 'refused' for r in rs)} | "
                   f"{sum(r['status'] == 'failed' for r in rs)} | "
                   f"{cover if t in TARGETS else '-'} / {len(anchors_good)} | {med} | {vs} | {zero} | {qs} |")
    return "\n".join(out)


def families(records, targets) -> str:
    by = latest(records)
    fams = defaultdict(list)
    for m in dict.fromkeys(r["model"] for r in records):
        fams[next(r["family"] for r in records if r["model"] == m)].append(m)
    out = ["| family | models | " + " | ".join(f"{t} ok (median dB)" for t in targets) + " |",
           "|---|---|" + "---|" * len(targets)]
    for fam, ms in fams.items():
        cells = []
        for t in targets:
            ok = [by[(m, t)]["sqnr_db"] for m in ms if (m, t) in by and by[(m, t)]["status"] == "ok"]
            ran = sum((m, t) in by for m in ms)
            cells.append(f"{len(ok)}/{ran}" + (f" ({statistics.median(ok):.1f})" if ok else ""))
        out.append(f"| {fam} | {len(ms)} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def failures(records, targets) -> str:
    """Refusals and failures by class: count, flows, example models."""
    by = latest(records)
    classes = defaultdict(list)
    for (m, t), r in by.items():
        if t in targets and r["status"] != "ok":
            classes[(r["status"], failure_class(r))].append((m, t))
    out = ["| count | status | class | flows | example models |", "|---|---|---|---|---|"]
    for (status, cls), hits in sorted(classes.items(), key=lambda kv: -len(kv[1])):
        models = list(dict.fromkeys(m.partition(":")[2] for m, _ in hits))
        ts = ", ".join(sorted({t for _, t in hits}))
        cls = cls.replace("|", "\\|")
        out.append(f"| {len(hits)} | {status} | {cls} | {ts} | {', '.join(models[:4])}"
                   + (f" (+{len(models) - 4})" if len(models) > 4 else "") + " |")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", help="model ids (timm:NAME, transformers:NAME, or a bare timm name)")
    p.add_argument("--families", nargs="+", help=f"families: {', '.join(SAMPLE)}, text, vision, audio")
    p.add_argument("--limit", type=int, help="the first N models of the selection")
    p.add_argument("--targets", nargs="+", default=list(FLOWS), choices=FLOWS, help="flows (default all)")
    p.add_argument("--jobs", type=int, default=1, help="models at a time")
    p.add_argument("--timeout", type=int, default=1800, help="seconds per model, all flows")
    p.add_argument("--flow-timeout", type=int, default=600, help="seconds per flow")
    p.add_argument("--size", type=int, default=SMALL_INPUT, help="image size to try first (timm)")
    p.add_argument("--calib-batches", type=int, default=2, help="calibration batches of 2")
    p.add_argument("--threads", type=int, default=1, help="torch threads per child")
    p.add_argument("--out", default="coverage.jsonl", help="JSON lines, appended; a new run resumes")
    p.add_argument("--retry", action="store_true", help="run the failed (model, flow) pairs again")
    p.add_argument("--report", help="write the markdown tables here (printed too)")
    p.add_argument("--report-only", action="store_true", help="only rebuild the report from --out")
    p.add_argument("--list", action="store_true", help="list the selected models and exit")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--family", help=argparse.SUPPRESS)
    p.add_argument("--flows", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return child(args)
    if args.list:
        for m, fam in select(args):
            print(f"{m:50s} {fam}")
        return 0
    if not args.report_only:
        run(args)
    text = report(load(args.out), args.targets)
    if args.report:
        Path(args.report).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
