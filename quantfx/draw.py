"""Annotated graph diagrams with graphviz: ``quantfx.draw(gm, 'graph.svg')``.

Works for any ``torch.fx.GraphModule``: a traced float model, the graph after any pass, or a quantized model.
Nodes show their op or module type and name; quantized edges show bit width and sign, scale (``2^-n`` when a
power of two) and accumulator widths; inputs that share one quantizer are coloured alike and the group named;
float regions are white with dashed edges; a legend explains it.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Optional

import graphviz
from torch import fx

from .errors import DrawError
from .graph import (
    fmt_scale, is_act_quant, is_add, is_cat, is_compute, is_invariant, is_trunc_pool, module_of, qmeta,
)

FORMATS = ("svg", "png", "pdf", "dot")
QUANT_FILL, FLOAT_FILL, IO_FILL = "#d6e6f5", "#ffffff", "#eeeeee"
PALETTE = ["#f4b183", "#a9d18e", "#ffd966", "#c9a0dc", "#9dc3e6", "#f8cbad", "#b4c7e7", "#c5e0b4", "#ffe699",
           "#d9d2e9"]
INSTALL = ("install graphviz's `dot` program (Debian/Ubuntu: apt-get install graphviz; macOS: brew install "
           "graphviz; conda: conda install graphviz)")


def edge_label(node: fx.Node) -> Optional[str]:
    """The label of the edge leaving ``node`` (its output's quantization), or None when float."""
    meta = qmeta(node)
    if not meta.is_quantized:
        return None
    sign = "int" if meta.signed else "uint"
    if meta.kind == "acc":
        return f"acc {meta.bit_width}b\n{fmt_scale(meta.scale)}"
    return f"{sign}{meta.bit_width}\n{fmt_scale(meta.scale)}"


def _op_name(gm, node: fx.Node) -> str:
    if node.op == "call_module":
        return type(module_of(gm, node)).__name__
    if node.op in ("call_function", "call_method"):
        return getattr(node.target, "__name__", str(node.target))
    return node.op


def node_style(gm, node: fx.Node, groups: dict) -> tuple[str, dict]:
    """(label, attributes) for one node."""
    name = node.target if node.op == "call_module" else node.name
    if node.op in ("placeholder", "output"):
        return f"{node.op}\n{node.name}", dict(shape="ellipse", fillcolor=IO_FILL)
    lines = [_op_name(gm, node), str(name)]
    meta = qmeta(node)
    if is_compute(gm, node):
        m = module_of(gm, node)
        wq, bq = m.weight_quant, m.bias_quant
        if wq.is_quant_enabled:
            per = " per-ch" if wq.scaling_per_output_channel else ""
            lines.append(f"w {'int' if wq.signed else 'uint'}{wq.bit_width}{per}")
        if m.bias is not None:
            lines.append(f"b {bq.bit_width} {bq.bias_scaling}" if bq.is_quant_enabled else "b float")
    quantized = is_compute(gm, node) or is_act_quant(gm, node) or is_trunc_pool(gm, node) or \
        ((is_add(node) or is_cat(node) or is_invariant(gm, node)) and meta.is_quantized)
    attrs = dict(fillcolor=QUANT_FILL if quantized else FLOAT_FILL)
    if meta.group and (is_act_quant(gm, node) or is_cat(node) or is_add(node)):
        lines.append(f"group {meta.group}")
        attrs["fillcolor"] = groups.setdefault(meta.group, PALETTE[len(groups) % len(PALETTE)])
        if not is_act_quant(gm, node):
            attrs["style"] = "rounded,filled,bold"
    return "\n".join(lines), attrs


def to_graphviz(gm: fx.GraphModule, title: Optional[str] = None) -> graphviz.Digraph:
    g = graphviz.Digraph(
        "quantfx", graph_attr=dict(rankdir="TB", fontname="Helvetica", fontsize="12", label=title or "",
                                   labelloc="t", nodesep="0.25", ranksep="0.35"),
        node_attr=dict(shape="box", style="rounded,filled", fontname="Helvetica", fontsize="10"),
        edge_attr=dict(fontname="Helvetica", fontsize="8"))
    groups: dict[str, str] = {}
    for node in gm.graph.nodes:
        label, attrs = node_style(gm, node, groups)
        g.node(node.name, label, **attrs)
        for src in node.all_input_nodes:
            text = edge_label(src)
            if text is None:
                g.edge(src.name, node.name, style="dashed", color="#888888")
            else:
                g.edge(src.name, node.name, label=text, color="#1f4e79", penwidth="1.4")
    _legend(g, groups)
    return g


def _legend(g: graphviz.Digraph, groups: dict) -> None:
    with g.subgraph(name="cluster_legend") as c:
        c.attr(label="legend", fontsize="10", style="dashed", color="#999999")
        c.node("legend_q", "quantized op", fillcolor=QUANT_FILL)
        c.node("legend_f", "float op", fillcolor=FLOAT_FILL)
        items = ["legend_q", "legend_f"]
        for i, (group, colour) in enumerate(list(groups.items())[:4]):
            c.node(f"legend_g{i}", f"shared quantizer\n{group}", fillcolor=colour)
            items.append(f"legend_g{i}")
        c.edge("legend_q", "legend_f", label="int8 2^-5: bits, sign, scale\nacc 21b: accumulator", color="#1f4e79")
        c.node("legend_f2", "float edge", fillcolor=FLOAT_FILL)
        c.edge("legend_f", "legend_f2", style="dashed", color="#888888")
        for a, b in zip(items[2:], items[3:]):
            c.edge(a, b, style="invis")


def draw(gm: fx.GraphModule, path, title: Optional[str] = None) -> Path:
    """Draw ``gm`` to ``path`` (.svg, .png, .pdf or .dot) and return the path.

    Raises DrawError when graphviz's ``dot`` program is missing (the .dot source is written anyway)."""
    path = Path(path)
    fmt = path.suffix.lstrip(".").lower()
    if fmt not in FORMATS:
        raise DrawError(f"draw: {path.name}: unknown format {fmt!r}; use one of {', '.join(FORMATS)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    g = to_graphviz(gm, title)
    if fmt == "dot":
        path.write_text(g.source)
        return path
    dot_path = path.with_suffix(".dot")
    if shutil.which("dot") is None:
        dot_path.write_text(g.source)
        raise DrawError(f"draw: graphviz's `dot` program was not found, so {path.name} was not rendered; the "
                        f"source is in {dot_path}. To render: {INSTALL}")
    try:
        path.write_bytes(g.pipe(format=fmt))
    except graphviz.ExecutableNotFound as e:
        dot_path.write_text(g.source)
        raise DrawError(f"draw: {e}; the source is in {dot_path}. To render: {INSTALL}") from e
    return path


def dump_diagram(gm: fx.GraphModule, stem: Path) -> None:
    """PassManager hook: write ``stem.svg`` (or only ``stem.dot`` when graphviz is missing)."""
    try:
        draw(gm, Path(stem).with_suffix(".svg"), title=Path(stem).name)
    except DrawError:
        pass
