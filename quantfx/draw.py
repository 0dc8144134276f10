"""Annotated graph diagrams with graphviz: ``quantfx.draw(gm, 'graph.svg')``.

Works for any ``torch.fx.GraphModule``: a traced float model, the graph after any pass, or a quantized model.
Nodes show their op or module type and name (compute layers also their weight bits and bias mode); quantized
edges show bit width and sign, scale (``2^-n`` when a power of two) and accumulator widths, read from
``node.meta['quant']``; inputs that share one quantizer are coloured alike and the group named; float nodes are
white with dashed grey edges; a legend explains it. The whole graph is laid out by one ``dot`` layout.

Rendering needs no system program: the pygraphviz wheel (a quantfx dependency on Linux x86_64/aarch64, macOS arm64
and Windows x64) carries Graphviz's libraries, and the layout runs in-process. Elsewhere a ``dot`` program on
PATH is used; with neither, the ``.dot`` source is still written and DrawError says how to get a renderer.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Optional

import graphviz
from torch import fx

from .errors import DrawError
from .graph import (
    META_KEY, QMeta, fmt_scale, group_of, is_act_quant, is_add, is_cat, is_compute, is_link, is_trunc_pool, module_of,
    qmeta,
)

FORMATS = ("svg", "png", "pdf", "dot")
QUANT_FILL, FLOAT_FILL, IO_FILL = "#dbe9f6", "#ffffff", "#eeeeee"
QUANT_EDGE, FLOAT_EDGE = "#1f4e79", "#999999"
# group colours: warm and green hues only, so none is mistaken for the light blue of quantized ops
PALETTE = ["#f4b183", "#a9d18e", "#ffd966", "#d5a6e6", "#f8cbad", "#c5e0b4", "#ffe699", "#e6b8b7", "#b7dee8",
           "#fcd5b4"]
LEGEND_GROUPS = 6
# dot's layout time grows with the ranks its edges cross (it threads a virtual node through each): a DenseNet
# block, where every layer reads all earlier ones, crosses hundreds of thousands. Above SPAN_LABELS, edge labels
# become xlabels (placed after layout, so they do not double the ranks) and crossing minimisation and positioning
# get a bounded effort; above SPAN_STRAIGHT, edges are also drawn straight and crossing minimisation is cut short
# (Graphviz 14's spline routing, in the pygraphviz wheel, took 30 s for 22,000 crossed ranks, 1.4 s for 3,200;
# straight, 1.7 s). A DenseNet-121-shaped graph then renders in seconds instead of minutes (tools/bench_draw.py);
# small graphs keep the full-effort layout.
SPAN_LABELS, SPAN_STRAIGHT = 1500, 5000
INSTALL = ("`pip install pygraphviz` (its wheels carry Graphviz), or install graphviz's `dot` program (Debian/Ubuntu: "
           "apt-get install graphviz; macOS: brew install graphviz; conda: conda install graphviz)")


def output_meta(gm: fx.GraphModule, node: fx.Node) -> tuple[QMeta, bool]:
    """(quantization of ``node``'s output, whether it came from ``node.meta``).

    Graphs not yet annotated (dumps after swap_modules or share_quantizers) still show their activation
    quantizers' widths and groups, without scales."""
    if META_KEY in node.meta:
        return qmeta(node), True
    if is_act_quant(gm, node):
        q = module_of(gm, node).act_quant
        if q.is_quant_enabled:
            group = group_of(node, q)
            return QMeta("act", q.bit_width, q.signed, q.narrow_range, group=group), False
    return qmeta(node), False


def edge_label(meta: QMeta, with_scale: bool = True) -> Optional[str]:
    """The label of an edge carrying ``meta``: ``int8\\n2^-5``, ``acc 21b\\n3.1e-05``; None when float."""
    if not meta.is_quantized:
        return None
    if meta.kind == "acc":
        head = f"acc {meta.bit_width}b"
    else:
        head = f"{'int' if meta.signed else 'uint'}{meta.bit_width}" + (" trunc" if meta.kind == "trunc" else "")
    return f"{head}\n{fmt_scale(meta.scale, digits=3)}" if with_scale else head


def _op_name(gm, node: fx.Node) -> str:
    if node.op == "call_module":
        return type(module_of(gm, node)).__name__
    if node.op in ("call_function", "call_method"):
        return getattr(node.target, "__name__", str(node.target))
    return node.op


def _bits(q) -> str:
    return f"{'int' if q.signed else 'uint'}{q.bit_width}"


def node_label(gm, node: fx.Node, meta: QMeta) -> str:
    """``type\\nname`` (the name once when it repeats the op: ``cat``), plus weight bits and bias mode of a
    compute layer and the shared-quantizer group."""
    if node.op == "placeholder":
        return f"input\n{node.name}"
    if node.op == "output":
        return "output"
    op, name = _op_name(gm, node), str(node.target if node.op in ("call_module", "get_attr") else node.name)
    lines = [op] if name == op else [op, name]
    if is_compute(gm, node):
        m = module_of(gm, node)
        wq, bq = m.weight_quant, m.bias_quant
        if wq.is_quant_enabled:
            lines.append(f"w {_bits(wq)}" + (" per-channel" if wq.scaling_per_output_channel else ""))
        else:
            lines.append("w float")
        if m.bias is not None:
            lines.append(f"b {_bits(bq)} {bq.bias_scaling}" if bq.is_quant_enabled else "b float")
    if meta.group and (is_act_quant(gm, node) or is_add(node) or is_cat(node)):
        lines.append(f"group {meta.group}")
    return "\n".join(lines)


def rank_span(nodes) -> int:
    """How many ranks the edges of a topologically ordered node list cross in total (longest-path ranks): about
    the number of virtual nodes dot inserts, which its layout time grows with."""
    rank: dict = {}
    total = 0
    for node in nodes:
        inputs = [a for a in node.all_input_nodes if a in rank]  # (a link outside ``nodes`` is no edge)
        rank[node] = max((rank[a] + 1 for a in inputs), default=0)
        total += sum(rank[node] - rank[a] for a in inputs)
    return total


def to_graphviz(gm: fx.GraphModule, title: Optional[str] = None) -> graphviz.Digraph:
    """The diagram of ``gm`` as a ``graphviz.Digraph`` (not rendered)."""
    nodes = [n for n in gm.graph.nodes if not is_link(gm, n)]  # links (a layer's input quantizer) are not drawn
    span = rank_span(nodes)
    graph_attr = dict(rankdir="TB", fontname="Helvetica", fontsize="14", label=title or "", labelloc="t",
                      nodesep="0.3", ranksep="0.3")
    if span > SPAN_LABELS:
        graph_attr.update(nslimit="0.2", nslimit1="1", mclimit="0.3", forcelabels="true")
    if span > SPAN_STRAIGHT:
        graph_attr.update(splines="line", mclimit="0.05")
    g = graphviz.Digraph(
        "quantfx", graph_attr=graph_attr,
        node_attr=dict(shape="box", style="rounded,filled", fontname="Helvetica", fontsize="11", margin="0.1,0.04",
                       color="#555555"),
        edge_attr=dict(fontname="Helvetica", fontsize="9", arrowsize="0.6"))
    metas = {node: output_meta(gm, node) for node in nodes}
    groups: dict[str, str] = {}
    label_key = "xlabel" if span > SPAN_LABELS else "label"
    for node in nodes:
        meta, annotated = metas[node]
        g.node(node.name, _lines(node_label(gm, node, meta)), **_node_attrs(gm, node, meta, groups))
        for src in node.all_input_nodes:
            if src not in metas:
                continue
            src_meta, src_annotated = metas[src]
            text = edge_label(src_meta, with_scale=src_annotated)
            if text is None:
                g.edge(src.name, node.name, style="dashed", color=FLOAT_EDGE)
            else:
                g.edge(src.name, node.name, color=QUANT_EDGE, penwidth="1.3", fontcolor=QUANT_EDGE,
                       **{label_key: _lines(text)})
    _legend(g, groups, annotated=any(META_KEY in node.meta for node in nodes), label_key=label_key)
    return g


def _lines(text: str) -> str:
    """Newlines as dot's ``\\n`` escape, so every statement of the source stays on one line."""
    return text.replace("\n", "\\n")


def _node_attrs(gm, node: fx.Node, meta: QMeta, groups: dict) -> dict:
    if node.op in ("placeholder", "output"):
        return dict(shape="ellipse", fillcolor=IO_FILL)
    quantized = is_compute(gm, node) or is_act_quant(gm, node) or is_trunc_pool(gm, node) or meta.is_quantized
    attrs = dict(fillcolor=QUANT_FILL if quantized else FLOAT_FILL)
    if meta.group and (is_act_quant(gm, node) or is_add(node) or is_cat(node)):
        attrs["fillcolor"] = groups.setdefault(meta.group, PALETTE[len(groups) % len(PALETTE)])
        if not is_act_quant(gm, node):
            attrs.update(style="rounded,filled,bold", penwidth="2")  # the add/cat the group feeds
    return attrs


def _legend(g: graphviz.Digraph, groups: dict, annotated: bool, label_key: str) -> None:
    # node names contain a dot, which no torch.fx node name does, so they cannot collide with the graph's
    with g.subgraph(name="cluster_legend") as c:
        c.attr(label="legend", fontsize="11", style="dashed", color="#aaaaaa", margin="10")
        c.node("legend.q", "quantized op", fillcolor=QUANT_FILL)
        c.node("legend.f", "float op", fillcolor=FLOAT_FILL)
        column = ["legend.q", "legend.f"]
        for i, (group, colour) in enumerate(list(groups.items())[:LEGEND_GROUPS]):
            c.node(f"legend.g{i}", _lines(f"inputs sharing one\nquantizer: {group}"), fillcolor=colour)
            column.append(f"legend.g{i}")
        if groups:
            c.node("legend.join", _lines("add / cat fed\nby the group"), fillcolor=next(iter(groups.values())),
                   style="rounded,filled,bold", penwidth="2")
            column.append("legend.join")
        if len(groups) > LEGEND_GROUPS:
            c.node("legend.more", f"... {len(groups) - LEGEND_GROUPS} more groups", shape="plaintext",
                   style="")
            column.append("legend.more")
        for a, b in zip(column, column[1:]):
            c.edge(a, b, style="invis")
        # edge samples, stacked in a second column: a point, the edge, then what the style means
        float_meaning = "float tensor" if annotated else "float tensor,\nor not annotated yet"
        samples = [("q", "int8\n2^-5", "quantized: bits and sign,\nscale (2^-n or 3 digits)", {}),
                   ("a", "acc 21b\n2^-12", "accumulator width at\nconv / linear / add output", {}),
                   ("x", None, float_meaning, dict(style="dashed", color=FLOAT_EDGE))]
        previous = None
        for key, text, meaning, style in samples:
            c.node(f"legend.{key}0", "", shape="point", width="0.06", color="#555555")
            c.node(f"legend.{key}1", _lines(meaning), shape="plaintext", style="", fontsize="9")
            attrs = style or dict(color=QUANT_EDGE, penwidth="1.3", fontcolor=QUANT_EDGE, **{label_key: _lines(text)})
            c.edge(f"legend.{key}0", f"legend.{key}1", **attrs)
            if previous:
                c.edge(previous, f"legend.{key}0", style="invis")
            previous = f"legend.{key}1"


def _write_source(g: graphviz.Digraph, path: Path) -> Path:
    path.write_text(g.source)
    return path


def _pygraphviz():
    """The pygraphviz module, or None when it is not installed (or its bundled libraries do not load)."""
    try:
        import pygraphviz
    except ImportError:
        return None
    return pygraphviz


def renderer() -> Optional[str]:
    """What draws diagrams here: 'pygraphviz' (Graphviz's libraries from the wheel, in-process), 'dot' (a
    system program), or None (only .dot source can be written)."""
    if _pygraphviz() is not None:
        return "pygraphviz"
    return "dot" if shutil.which("dot") is not None else None


class _RenderError(Exception):
    """Graphviz refused the graph (the message is Graphviz's)."""


# Lines Graphviz's libraries print that say nothing about the diagram: the fontconfig bundled in the pygraphviz
# wheel is older than many systems' font configuration and warns about elements it does not know
# ('Fontconfig warning: ".../05-reset-dirs-sample.conf", line 6: unknown element "reset-dirs"'); the fonts load.
NATIVE_NOISE = ("Fontconfig warning:",)


@contextlib.contextmanager
def _filtered_native_stderr(noise=NATIVE_NOISE):
    """Run the block with file descriptor 2 captured (C libraries write there, past ``sys.stderr``), then pass
    on every captured line except those starting with one of ``noise``."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no file descriptor 2 (some embedded interpreters): nothing to filter
        yield
        return
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            kept = [line for line in captured.read().decode(errors="replace").splitlines(keepends=True)
                    if not line.startswith(noise)]
            if kept:
                sys.stderr.write("".join(kept))
                sys.stderr.flush()


def _render(g: graphviz.Digraph, fmt: str) -> bytes:
    """The diagram in ``fmt``, laid out by dot: in-process through pygraphviz, else by one ``dot`` process."""
    pgv = _pygraphviz()
    if pgv is not None:
        try:
            with _filtered_native_stderr():
                return pgv.AGraph(string=g.source).draw(format=fmt, prog="dot")
        except (ValueError, pgv.DotError) as e:
            raise _RenderError(str(e)) from e
    try:
        return g.pipe(format=fmt)
    except graphviz.CalledProcessError as e:
        raise _RenderError((e.stderr or b"").decode(errors="replace").strip() or str(e)) from e


def draw(gm: fx.GraphModule, path, title: Optional[str] = None) -> Path:
    """Draw ``gm`` to ``path`` and return ``path`` as a Path; the suffix (.svg, .png, .pdf, .dot) picks the
    format, and .dot writes the graphviz source only.

    Raises DrawError for an unknown suffix or a ``gm`` that is not a GraphModule, and when no renderer is
    available (:func:`renderer`) or Graphviz fails; then the source is written next to ``path`` (same name,
    .dot) and the message says where and how to get a renderer."""
    path = Path(path)
    fmt = path.suffix.lstrip(".").lower()
    if fmt not in FORMATS:
        raise DrawError(f"draw: {path.name}: unknown format {fmt!r}; use one of {', '.join(FORMATS)}")
    if not isinstance(gm, fx.GraphModule):
        raise DrawError(f"draw: expected a torch.fx.GraphModule, got {type(gm).__name__} (trace it with "
                        f"torch.fx.symbolic_trace, or draw the result of quantfx.quantize)")
    path.parent.mkdir(parents=True, exist_ok=True)
    g = to_graphviz(gm, title)
    if fmt == "dot":
        return _write_source(g, path)
    dot_path = path.with_suffix(".dot")
    if renderer() is None:
        _write_source(g, dot_path)
        raise DrawError(f"draw: no Graphviz renderer (neither pygraphviz nor a `dot` program), so {path.name} was "
                        f"not rendered; the source was written to {dot_path}. To render it, {INSTALL}")
    try:
        data = _render(g, fmt)
    except graphviz.ExecutableNotFound as e:
        _write_source(g, dot_path)
        raise DrawError(f"draw: {e}, so {path.name} was not rendered; the source was written to {dot_path}. "
                        f"To render it, {INSTALL}") from e
    except _RenderError as e:
        _write_source(g, dot_path)
        raise DrawError(f"draw: Graphviz failed on {path.name} ({e}); the source was written to {dot_path}") from e
    path.write_bytes(data)
    return path


def dump_diagram(gm: fx.GraphModule, stem) -> Path:
    """PassManager ``on_dump`` hook: write ``stem.svg``; when there is no renderer (or it fails), write
    ``stem.dot`` and warn instead of raising, so a diagram never stops a compilation. Returns the file
    written."""
    stem = Path(stem)
    if renderer() is None:
        # a constant message: Python shows it once, not once per pass
        warnings.warn(f"quantfx: pass dumps are written as .dot source only: {INSTALL}", stacklevel=2)
        return draw(gm, stem.parent / f"{stem.name}.dot")
    try:
        return draw(gm, stem.parent / f"{stem.name}.svg", title=stem.name)
    except DrawError as e:
        warnings.warn(str(e), stacklevel=2)
        return stem.parent / f"{stem.name}.dot"


# ``quantfx.draw`` is the function once the package is imported (it shadows this module's name there), so the
# hook is reachable as ``quantfx.draw.dump_diagram`` too, as well as ``from quantfx.draw import dump_diagram``.
draw.dump_diagram = dump_diagram
