"""quantfx.draw: every format for float and quantized graphs, edge labels equal to node.meta, shared-group colours,
legend, the renderers (pygraphviz in-process, a system `dot`, neither),
pass dumps, graphs large enough to need the bounded-effort layout."""
import importlib
import re
import shutil
import warnings

import graphviz
import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

import quantfx
from quantfx.draw import SPAN_LABELS, dump_diagram, edge_label, rank_span, to_graphviz
from quantfx.graph import QMeta, fmt_scale, is_act_quant, is_add, is_cat, is_compute, is_link, qmeta

draw_module = importlib.import_module("quantfx.draw")  # quantfx.draw is the function


class LeNetLike(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 6, 5), nn.Conv2d(6, 16, 5)
        self.fc1, self.fc2 = nn.Linear(16 * 4 * 4, 32), nn.Linear(32, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc2(F.relu(self.fc1(torch.flatten(x, 1))))


class ResidualCat(nn.Module):
    """conv-relu, a residual add, a skip concatenation: two shared-quantizer groups."""

    def __init__(self):
        super().__init__()
        self.conv1, self.relu1 = nn.Conv2d(3, 8, 3, padding=1), nn.ReLU()
        self.conv2, self.conv3 = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 1)

    def forward(self, x):
        x = self.relu1(self.conv1(x))
        y = self.conv2(x) + x
        return torch.cat([y, self.conv3(x)], 1)


class DenseBlock(nn.Module):
    """Every layer reads the concatenation of all earlier outputs: long edges, like a DenseNet block."""

    def __init__(self, n_layers=12, c=4):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.convs = nn.ModuleList(nn.Conv2d(c * (i + 1), c, 3, padding=1) for i in range(n_layers))
        self.relus = nn.ModuleList(nn.ReLU() for _ in range(n_layers))

    def forward(self, x):
        features = [self.stem(x)]
        for conv, relu in zip(self.convs, self.relus):
            features.append(relu(conv(torch.cat(features, 1))))
        return torch.cat(features, 1)


@pytest.fixture(scope="module")
def qmodel():
    torch.manual_seed(0)
    return quantfx.quantize(ResidualCat().eval(), "finn", calibration_data=[torch.randn(2, 3, 8, 8)], progress=False)


@pytest.fixture(scope="module")
def lenet():
    return fx.symbolic_trace(LeNetLike())


def edges(src: str) -> dict:
    """{(tail, head): attribute text} of the graph's edges (the legend's excluded)."""
    out = {}
    for tail, head, attrs in re.findall(r'^\t"?([\w.]+)"? -> "?([\w.]+)"? \[(.*?)\]$', src, re.M | re.S):
        if not tail.startswith("legend."):
            out[(tail, head)] = attrs
    return out


def fillcolor(src: str, name: str) -> str:
    return re.search(rf'^\t{name} \[label=.*?fillcolor="([^"]+)"', src, re.M | re.S).group(1)


MAGIC = {".svg": b"<?xml", ".png": b"\x89PNG\r\n\x1a\n", ".pdf": b"%PDF-", ".dot": b"digraph quantfx {"}


@pytest.mark.parametrize("suffix", MAGIC)
@pytest.mark.parametrize("which", ["float", "quantized"])
def test_every_format_for_float_and_quantized_graphs(which, suffix, qmodel, lenet, tmp_path):
    gm = lenet if which == "float" else qmodel
    path = quantfx.draw(gm, tmp_path / f"g{suffix}", title=which)
    assert path == tmp_path / f"g{suffix}"
    data = path.read_bytes()
    assert data.startswith(MAGIC[suffix])
    if suffix == ".svg":
        text = data.decode()
        links = [n for n in gm.graph.nodes if is_link(gm, n)]
        assert all(f">{n.name}<" in text or n.op == "output" for n in gm.graph.nodes
                   if n.op != "call_module" and n not in links)
        # the quantizers passed to layers (input_quantizer=...) are edges of the program, not drawn as nodes
        assert (len(links) > 0) == (which == "quantized") and not any(f">{n.name}<" in text for n in links)
    assert not (tmp_path / "g.dot").exists() or suffix == ".dot"  # .dot only when asked for


def test_float_graph_every_edge_dashed_every_node_white(lenet, tmp_path):
    src = quantfx.draw(lenet, tmp_path / "lenet.dot").read_text()
    es = edges(src)
    assert len(es) == sum(len(n.all_input_nodes) for n in lenet.graph.nodes) == 11
    assert all("style=dashed" in a and "label" not in a for a in es.values())
    for node in lenet.graph.nodes:
        if node.op not in ("placeholder", "output"):
            assert fillcolor(src, node.name) == "#ffffff", node.name
    assert r'label="Conv2d\nconv1"' in src and 'label=flatten' in src and r'label="relu\nrelu_1"' in src


def test_quantized_edge_labels_equal_node_meta(qmodel, tmp_path):
    src = quantfx.draw(qmodel, tmp_path / "q.dot").read_text()
    es = edges(src)
    for node in qmodel.graph.nodes:
        drawn = re.search(rf"^\t{node.name} \[", src, re.M)
        assert bool(drawn) != is_link(qmodel, node), node.name
    n_compute = n_act = 0
    for (tail, head), attrs in es.items():
        tail_node = _node(qmodel, tail)
        meta = qmeta(tail_node)
        if not meta.is_quantized:
            assert "style=dashed" in attrs
            continue
        label = re.search(r'label="([^"]*)"', attrs).group(1).replace(r"\n", "\n")
        if is_compute(qmodel, tail_node):
            n_compute += 1
            assert label == f"acc {meta.bit_width}b\n{fmt_scale(meta.scale, digits=3)}"
            assert meta.bit_width > 16
        if is_act_quant(qmodel, tail_node):
            n_act += 1
            assert label.split("\n")[0] == ("int8" if meta.signed else "uint8")
    assert n_compute == 3 and n_act >= 5
    assert r'label="uint8\n' in src and r'label="int8\n' in src
    assert r'label="acc 9b\n' in src  # the residual add: int8 + int8 -> 9 bits
    assert "w int8" in src and "b int32 external" in src


def _node(gm, name):
    return next(n for n in gm.graph.nodes if n.name == name)


def test_shared_groups_coloured_alike_and_named(qmodel, tmp_path):
    src = quantfx.draw(qmodel, tmp_path / "q.dot").read_text()
    groups = {}
    for node in qmodel.graph.nodes:
        if is_act_quant(qmodel, node) and qmeta(node).group:
            groups.setdefault(qmeta(node).group, []).append(node)
    assert len(groups) == 2 and all(len(members) == 2 for members in groups.values())
    colours = {}
    for group, members in groups.items():
        fills = {fillcolor(src, m.name) for m in members}
        assert len(fills) == 1, group
        colours[group] = fills.pop()
        for m in members:
            assert re.search(rf'^\t{m.name} \[label="[^"]*group {group}"', src, re.M)
    assert len(set(colours.values())) == 2 and "#dbe9f6" not in colours.values()
    # the add and the cat each carry their inputs' group, name and colour
    joins = [n for n in qmodel.graph.nodes if is_add(n) or is_cat(n)]
    assert len(joins) == 2
    for join in joins:
        group = qmeta(join).group
        assert fillcolor(src, join.name) == colours[group]
        assert f"group {group}" in re.search(rf'^\t{join.name} \[label="([^"]*)"', src, re.M).group(1)


def test_legend_explains_colours_and_edges(qmodel, tmp_path):
    src = quantfx.draw(qmodel, tmp_path / "q.dot").read_text()
    legend = src[src.index("subgraph cluster_legend"):]
    assert "quantized op" in legend and "float op" in legend and "float tensor" in legend
    assert "accumulator width" in legend and "style=dashed" in legend
    for group in {qmeta(n).group for n in qmodel.graph.nodes if qmeta(n).group}:
        assert f"quantizer: {group}" in legend


def test_per_channel_weights_and_float_layers(tmp_path):
    torch.manual_seed(0)
    q = quantfx.quantize(LeNetLike().eval(), "onnx", calibration_data=[torch.randn(2, 1, 28, 28)],
                         overrides={"fc2": None}, progress=False)
    src = quantfx.draw(q, tmp_path / "q.dot").read_text()
    assert r'label="QuantConv2d\nconv1\nw int7 per-channel' in src  # onnx: 7-bit weights
    assert re.search(r'label="acc \d+b\\n\[6\] [\d.e-]+\.\.[\d.e-]+"', src)  # conv1's per-channel accumulator scale
    assert fillcolor(src, "fc2") == "#ffffff" and r'label="Linear\nfc2"' in src


def test_edge_label_text():
    po2 = QMeta("act", 8, True, scale=torch.tensor(2.0 ** -5))
    assert edge_label(po2) == "int8\n2^-5"
    assert edge_label(QMeta("act", 4, False, scale=torch.tensor(0.012345))) == "uint4\n0.0123"
    assert edge_label(QMeta("acc", 21, True, scale=torch.tensor(3.14159e-5))) == "acc 21b\n3.14e-05"
    assert edge_label(QMeta("trunc", 8, False, scale=torch.tensor(0.25))) == "uint8 trunc\n2^-2"
    assert edge_label(QMeta("act", 8, True, scale=torch.tensor([0.5, 0.1, 0.25]))) == "int8\n[3] 0.1..0.5"
    assert edge_label(QMeta("act", 8, True)) == "int8\nuncalibrated"
    assert edge_label(po2, with_scale=False) == "int8"
    assert edge_label(QMeta()) is None


def no_renderer(monkeypatch):
    """A machine with neither pygraphviz nor a `dot` program."""
    monkeypatch.setattr(draw_module, "_pygraphviz", lambda: None)
    monkeypatch.setattr(shutil, "which", lambda name: None)


def test_renders_in_process_without_a_dot_program(qmodel, tmp_path, monkeypatch):
    """The pygraphviz wheel brings Graphviz: no system program is needed, and none is started."""
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.setattr(graphviz.Digraph, "pipe", lambda *a, **k: pytest.fail("a dot process was started"))
    assert draw_module.renderer() == "pygraphviz"
    for suffix in (".svg", ".png", ".pdf"):
        path = quantfx.draw(qmodel, tmp_path / f"g{suffix}")
        assert path.read_bytes().startswith(MAGIC[suffix])


def test_without_pygraphviz_a_system_dot_renders(qmodel, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(draw_module, "_pygraphviz", lambda: None)
    monkeypatch.setattr(shutil, "which", lambda name: "/usr/bin/dot" if name == "dot" else None)
    monkeypatch.setattr(graphviz.Digraph, "pipe", lambda self, format: calls.append(format) or b"<?xml dot")
    assert draw_module.renderer() == "dot"
    assert quantfx.draw(qmodel, tmp_path / "g.svg").read_bytes() == b"<?xml dot" and calls == ["svg"]


def test_no_renderer_writes_source_and_says_how_to_get_one(qmodel, tmp_path, monkeypatch):
    no_renderer(monkeypatch)
    assert draw_module.renderer() is None
    with pytest.raises(quantfx.DrawError) as e:
        quantfx.draw(qmodel, tmp_path / "g.svg")
    message = str(e.value)
    for hint in ("pip install pygraphviz", "apt-get install graphviz", "brew install graphviz"):
        assert hint in message
    assert str(tmp_path / "g.dot") in message
    assert (tmp_path / "g.dot").read_text().startswith("digraph quantfx {")
    assert not (tmp_path / "g.svg").exists()


def test_dot_vanishing_after_which_is_a_draw_error(qmodel, tmp_path, monkeypatch):
    def pipe(self, *args, **kwargs):
        raise graphviz.ExecutableNotFound(["dot", "-Kdot", "-Tpng"])
    monkeypatch.setattr(draw_module, "_pygraphviz", lambda: None)
    monkeypatch.setattr(shutil, "which", lambda name: "/usr/bin/dot")
    monkeypatch.setattr(graphviz.Digraph, "pipe", pipe)
    with pytest.raises(quantfx.DrawError, match="pip install pygraphviz"):
        quantfx.draw(qmodel, tmp_path / "g.png")
    assert (tmp_path / "g.dot").exists() and not (tmp_path / "g.png").exists()
    assert isinstance(quantfx.DrawError("x"), quantfx.QuantFXError)


def test_graphviz_refusing_the_graph_is_a_draw_error(qmodel, tmp_path, monkeypatch):
    monkeypatch.setattr(draw_module, "to_graphviz", lambda gm, title=None: graphviz.Digraph(
        "quantfx", body=["  a -> b [label=<unclosed]\n"]))
    with pytest.raises(quantfx.DrawError, match="Graphviz failed on g.svg"):
        quantfx.draw(qmodel, tmp_path / "g.svg")
    assert (tmp_path / "g.dot").exists() and not (tmp_path / "g.svg").exists()


def test_bad_arguments(qmodel, tmp_path):
    with pytest.raises(quantfx.DrawError, match="unknown format 'jpg'"):
        quantfx.draw(qmodel, tmp_path / "g.jpg")
    with pytest.raises(quantfx.DrawError, match="expected a torch.fx.GraphModule, got LeNetLike"):
        quantfx.draw(LeNetLike(), tmp_path / "g.svg")
    assert list(tmp_path.iterdir()) == []


def test_dump_diagram_without_dot_writes_only_source(qmodel, tmp_path, monkeypatch):
    assert quantfx.draw.dump_diagram is dump_diagram
    assert dump_diagram(qmodel, tmp_path / "07_annotate") == tmp_path / "07_annotate.svg"
    no_renderer(monkeypatch)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        written = dump_diagram(qmodel, tmp_path / "00_trace")
    assert written == tmp_path / "00_trace.dot" and written.exists()
    assert not (tmp_path / "00_trace.svg").exists() and "pip install pygraphviz" in str(caught[0].message)


def test_dump_dir_writes_text_and_diagram_per_pass(tmp_path):
    quantfx.quantize(ResidualCat().eval(), "finn", example_inputs=(torch.randn(1, 3, 8, 8),), dump_dir=tmp_path)
    texts, svgs = sorted(tmp_path.glob("*.txt")), sorted(tmp_path.glob("*.svg"))
    names = ["trace", "propagate_shapes", "canonicalize", "fuse_conv_bn", "swap_modules", "share_quantizers",
             "choose_bias_scaling", "quantize_products", "annotate"]
    assert [p.name for p in texts] == [f"{i:02d}_{n}.txt" for i, n in enumerate(names)]
    assert [p.name for p in svgs] == [f"{i:02d}_{n}.svg" for i, n in enumerate(names)]
    assert not list(tmp_path.glob("*.dot"))
    # before swap_modules nothing is quantized; after it the quantizers' widths show (no scales: not annotated);
    # annotate adds the accumulators
    assert ">uint8<" not in svgs[3].read_text() and ">uint8<" in svgs[4].read_text()
    assert ">acc 9b<" not in svgs[7].read_text() and ">acc 9b<" in svgs[8].read_text()


def test_dump_dir_keeps_a_custom_hook(tmp_path):
    seen = []
    quantfx.quantize(ResidualCat().eval(), "finn", example_inputs=(torch.randn(1, 3, 8, 8),), dump_dir=tmp_path,
                     on_dump=lambda gm, stem: seen.append(stem.name))
    assert len(seen) == 9 and not list(tmp_path.glob("*.svg"))


def test_large_generated_graph_renders(tmp_path):
    from quantfx.zoo import deep_chain
    q = quantfx.quantize(deep_chain(150), "finn", calibration_data=[torch.randn(1, 3, 16, 16)], progress=False)
    assert len(q.graph.nodes) > 400
    path = quantfx.draw(q, tmp_path / "big.svg")
    assert path.read_bytes().startswith(b"<?xml") and path.read_text().count("<g id=\"node") > 400


def test_long_edges_switch_to_bounded_layout(tmp_path):
    torch.manual_seed(0)
    q = quantfx.quantize(DenseBlock().eval(), "finn", calibration_data=[torch.randn(1, 3, 8, 8)], progress=False)
    assert rank_span(list(q.graph.nodes)) > SPAN_LABELS
    src = to_graphviz(q).source
    assert "nslimit=0.2" in src and "xlabel=" in src and not re.search(r"-> \S+ \[.*\blabel=", src)
    assert quantfx.draw(q, tmp_path / "dense.svg").exists()
    small = to_graphviz(quantfx.quantize(ResidualCat().eval(), "finn")).source
    assert "nslimit" not in small and "xlabel" not in small
