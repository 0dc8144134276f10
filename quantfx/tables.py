"""Tables of a compiled model: ``layer_table`` (one row per quantized layer, quantizer, add and cat) and
``inspect`` (the same rows printed)."""
from __future__ import annotations

import json
import sys
from typing import Any, Optional

from torch import fx

from .graph import (
    META_KEY, USER_FLOAT_KEY, float_island, fmt_scale, is_act_quant, is_add, is_cat, is_compute, is_product,
    is_trunc_pool, module_of, op_name, qmeta,
)


def layer_table(qmodel: fx.GraphModule) -> list[dict[str, Any]]:
    """One row per quantized layer / quantizer / add / cat: name, op, weight/act/bias bits, scale, acc, group."""
    rows = []
    for node in qmodel.graph.nodes:
        meta = node.meta.get(META_KEY)
        if meta is None:
            continue
        row = None
        if is_compute(qmodel, node):
            m = module_of(qmodel, node)
            bq = m.bias_quant
            row = dict(name=node.target, op=type(m).__name__,
                       weight_bits=m.weight_quant.bit_width if m.weight_quant.is_quant_enabled else None,
                       act_bits=qmeta(node.args[0]).bit_width,
                       bias=(f"{bq.bit_width} {bq.bias_scaling}" if bq.is_quant_enabled
                             else ("float" if m.bias is not None else None)),
                       scale=fmt_scale(meta.scale), acc_bits=meta.bit_width, group=None,
                       method=weight_method(m.weight_quant))
        elif is_act_quant(qmodel, node):
            m = module_of(qmodel, node)
            row = dict(name=node.target, op=type(m).__name__, weight_bits=None,
                       act_bits=f"{'int' if meta.signed else 'uint'}{meta.bit_width}", bias=None,
                       scale=fmt_scale(meta.scale), acc_bits=None, group=meta.group,
                       method=m.act_quant.calibrated_by)
        elif is_trunc_pool(qmodel, node):
            row = dict(name=node.target, op=type(module_of(qmodel, node)).__name__, weight_bits=None,
                       act_bits=meta.bit_width, bias=None, scale=fmt_scale(meta.scale), acc_bits=None,
                       group=None)
        elif is_product(qmodel, node):
            row = dict(name=node.name, op=module_of(qmodel, node).op, weight_bits=None, act_bits=None, bias=None,
                       scale=fmt_scale(meta.scale), acc_bits=meta.bit_width, group=None)
        elif is_add(node) or is_cat(node):
            row = dict(name=node.name, op="add" if is_add(node) else "cat", weight_bits=None,
                       act_bits=meta.bit_width if is_cat(node) else None, bias=None, scale=fmt_scale(meta.scale),
                       acc_bits=meta.bit_width if is_add(node) else None, group=meta.group)
        if row is not None:
            rows.append(row)
    return rows


def weight_method(q) -> Optional[str]:
    """How a weight quantizer got its grid and integers: 'per-channel mse, learned rounding' and the like."""
    if not q.is_quant_enabled:
        return None
    how = "fixed" if q.fixed_scale is not None else q.scale_stat
    text = f"{'per-channel' if q.scaling_per_output_channel else 'per-tensor'} {how}"
    if not q.rounding_learned:
        return text
    return text + (", gptq rounding" if q.rounding_method == "gptq" else ", learned rounding")


FLOAT_ISLANDS_KEY = "quantfx.float_islands"  # an ONNX file's metadata: its float islands (absent when none)


def float_islands(qmodel: fx.GraphModule) -> list[dict[str, str]]:
    """The nodes of a compiled model that run in float between quantized regions (dequantized, computed in float,
    requantized by the activation quantizer after them), each with why: ``[{'node', 'op', 'why'}]``."""
    rows = []
    for node in qmodel.graph.nodes:
        why = float_island(qmodel, node)
        kept = node.meta.get(USER_FLOAT_KEY)
        if kept:  # True: by the user's overrides; a sentence: by a pass, saying why
            why = kept if isinstance(kept, str) else "kept float by overrides" + (f" ({why})" if why else "")
        if why is None:
            continue
        rows.append(dict(node=node.name, op=op_name(qmodel, node), why=why))
    return rows


def _island_lines(islands, title) -> list[str]:
    w = [max(len(r[k]) for r in islands) for k in ("node", "op")]
    return [title] + [f"  {r['node']:<{w[0]}}  {r['op']:<{w[1]}}  {r['why']}" for r in islands]


def capture_line(capture: dict) -> str:
    """How the model was captured, as inspect prints it: 'capture: export (why; shapes)'."""
    details = "; ".join(v for v in (capture.get("why"), capture.get("shapes")) if v)
    return f"capture: {capture['method']}" + (f" ({details})" if details else "")


def inspect(qmodel: fx.GraphModule, file=None) -> str:
    """Print (and return) a per-layer table: name, op, weight/act/bias bits, scale, accumulator, group, then the
    float islands. Given a lowered artefact that reports how each node runs (the torch target's program), print
    that report; given an ONNX file quantfx wrote, its float islands."""
    if not isinstance(qmodel, fx.GraphModule) and callable(getattr(qmodel, "table", None)):
        text = qmodel.table()
        print(text, file=file or sys.stdout)
        return text
    if not isinstance(qmodel, fx.GraphModule) and hasattr(qmodel, "metadata_props"):  # an ONNX file quantfx wrote
        props = {p.key: p.value for p in qmodel.metadata_props}
        islands = json.loads(props.get(FLOAT_ISLANDS_KEY, "[]"))
        lines = _island_lines(islands, "float islands of the file (DequantizeLinear -> float ops -> "
                                       "QuantizeLinear):") if islands else ["no float islands in the file"]
        text = "\n".join(lines)
        print(text, file=file or sys.stdout)
        return text
    rows = layer_table(qmodel)
    cols = ["name", "op", "weight_bits", "act_bits", "bias", "scale", "acc_bits", "group", "method"]
    cells = [[("" if r.get(c) is None else str(r[c])) for c in cols] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    budget = getattr(qmodel, "notes", {}).get("mixed_precision")  # quantfx.mixed_precision.NOTE
    if budget:
        lines.append("mixed precision, widths chosen under a budget: " + "; ".join(budget))
    islands = float_islands(qmodel)
    if islands:
        lines += _island_lines(islands, "float islands (dequantized, run in float, requantized by the quantizer "
                                        "after them):")
    capture = getattr(qmodel, "notes", {}).get("capture")
    if capture:
        lines.append(capture_line(capture))
    text = "\n".join(lines)
    print(text, file=file or sys.stdout)
    return text
