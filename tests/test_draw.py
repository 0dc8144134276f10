"""Diagrams: every format, labels from node.meta, shared-group colours, legend, missing `dot`, dump_dir."""
import re
import shutil

import pytest
import torch
from torch import fx, nn

import quantfx
from quantfx.draw import fmt_scale
from quantfx.graph import is_act_quant, qmeta


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.conv3 = nn.Conv2d(8, 8, 1)

    def forward(self, x):
        x = self.relu1(self.conv1(x))
        y = self.conv2(x) + x
        return torch.cat([y, self.conv3(x)], 1)


@pytest.fixture(scope="module")
def qmodel():
    torch.manual_seed(0)
    return quantfx.quantize(Block().eval(), "finn", calibration_data=[torch.randn(2, 3, 8, 8)], progress=False)


@pytest.mark.parametrize("suffix, magic", [(".svg", b"<?xml"), (".png", b"\x89PNG"), (".pdf", b"%PDF"),
                                           (".dot", b"digraph")])
def test_formats(qmodel, tmp_path, suffix, magic):
    path = quantfx.draw(qmodel, tmp_path / f"g{suffix}")
    assert path.read_bytes()[:len(magic)] == magic


def test_float_graph_draws_with_dashed_edges(tmp_path):
    gm = fx.symbolic_trace(Block())
    src = quantfx.draw(gm, tmp_path / "float.dot").read_text()
    assert src.count("style=dashed") >= 6  # every edge of a float graph (plus the legend's)
    assert "Conv2d" in src and "conv1" in src


def test_labels_groups_and_legend(qmodel, tmp_path):
    src = quantfx.draw(qmodel, tmp_path / "q.dot").read_text()
    for node in qmodel.graph.nodes:
        assert f"\t{node.name} [" in src or f'"{node.name}" [' in src, node.name
    assert "uint8" in src and "int8" in src and "acc " in src and "cluster_legend" in src
    groups = {qmeta(n).group for n in qmodel.graph.nodes if qmeta(n).group}
    assert len(groups) == 2
    for group in groups:
        members = [n.name for n in qmodel.graph.nodes if is_act_quant(qmodel, n) and qmeta(n).group == group]
        colours = {re.search(rf"\t{m} \[.*?fillcolor=\"?([#\w]+)", src, re.S).group(1) for m in members}
        assert len(colours) == 1 and group in src


def test_missing_dot_writes_source_and_says_how_to_install(qmodel, tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(quantfx.DrawError, match="apt-get install graphviz") as e:
        quantfx.draw(qmodel, tmp_path / "g.svg")
    assert (tmp_path / "g.dot").exists() and str(tmp_path / "g.dot") in str(e.value)
    assert not (tmp_path / "g.svg").exists()


def test_power_of_two_scales_print_as_powers():
    assert fmt_scale(torch.tensor(0.125)) == "2^-3"
    assert fmt_scale(torch.tensor(0.1)) == "0.1"
    assert fmt_scale(None) == "uncalibrated"
    assert fmt_scale(torch.tensor([0.5, 0.25])) == "[2] 0.25..0.5"


def test_unknown_suffix_is_an_error(qmodel, tmp_path):
    with pytest.raises(quantfx.DrawError, match="unknown format"):
        quantfx.draw(qmodel, tmp_path / "g.jpg")


def test_dump_dir_writes_text_and_diagram_per_pass(tmp_path):
    quantfx.quantize(Block().eval(), "finn", example_inputs=(torch.randn(1, 3, 8, 8),), dump_dir=tmp_path)
    texts, svgs = sorted(tmp_path.glob("*.txt")), sorted(tmp_path.glob("*.svg"))
    assert len(texts) == len(svgs) == 8  # one per pass of the default pipeline
    assert texts[0].name == "00_trace.txt" and svgs[-1].name == "07_annotate.svg"


def test_large_graph_renders(tmp_path):
    from quantfx.zoo import deep_chain
    q = quantfx.quantize(deep_chain(100), "finn", calibration_data=[torch.randn(1, 3, 16, 16)], progress=False)
    assert len(q.graph.nodes) > 250
    assert quantfx.draw(q, tmp_path / "big.svg").stat().st_size > 50_000
