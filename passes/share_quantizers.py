"""share_quantizers: give all inputs of every concatenation and residual add one shared quantizer object.

Each add/cat input is walked back through quantization-invariant ops (max-pool, flatten, view, reshape,
transpose, permute, chunk/split, getitem, pixel shuffle, identity) to the activation quantizer that produced
it; an input with none gets a QuantIdentity. Quantizers feeding the same add/cat are joined, transitively (a
cat of a cat, an add feeding an add), as connected components of a networkx graph. Each component gets one
new ``Quantizer`` (signed if any member is signed, the widest member's bit width), assigned to every member
module, so after calibration every input of an add/cat carries the identical scale tensor.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import networkx as nx
from torch import fx

from quantfx.graph import (
    insert_module_after, is_act_quant, is_add, is_cat, module_of, producer, tensor_inputs, unique_name,
)
from quantfx.nn import QuantIdentity
from quantfx.pass_infra import Pass, PassResult
from quantfx.quant import Quantizer

GROUP_KEY = "quant_group"


@dataclass(frozen=True)
class ShareQuantizers(Pass):
    name = "share_quantizers"
    profile: Any = None

    def call(self, gm: fx.GraphModule) -> PassResult:
        graph = nx.Graph()
        taken: set = set()
        for node in list(gm.graph.nodes):
            if not (is_add(node) or is_cat(node)):
                continue
            members = [self._quantizer_node(gm, inp, node, taken) for inp in tensor_inputs(node)]
            graph.add_nodes_from(members)
            graph.add_edges_from(zip(members, members[1:]))
        if graph.number_of_nodes() == 0:
            return PassResult(gm, False)
        order = {n: i for i, n in enumerate(gm.graph.nodes)}
        components = sorted((sorted(c, key=order.__getitem__) for c in nx.connected_components(graph)),
                            key=lambda c: order[c[0]])
        for index, members in enumerate(components):
            self._share(gm, members, f"share_group_{index}")
        return PassResult(gm, True)

    def _quantizer_node(self, gm, inp: fx.Node, consumer: fx.Node, taken) -> fx.Node:
        src = producer(gm, inp)
        if is_act_quant(gm, src):
            return src
        # No quantizer upstream (e.g. a float region): quantize this edge just before the consumer.
        q = QuantIdentity(act_quant=self.profile.act_quant, bit_width=self.profile.act_bit_width) \
            if self.profile is not None else QuantIdentity()
        return insert_module_after(gm, inp, q, unique_name(gm, inp.name + "_quant", taken), users=[consumer])

    @staticmethod
    def _share(gm, members: list[fx.Node], group: str) -> None:
        quantizers = [module_of(gm, n).act_quant for n in members]
        signed = [q for q in quantizers if q.signed]
        base = max(signed or quantizers, key=lambda q: q.bit_width)
        bits = max(q.bit_width for q in quantizers)
        shared = base if len(set(map(id, quantizers))) == 1 else base.clone_spec(bit_width=bits)
        shared.qname = group
        shared.group = group
        for n in members:
            module_of(gm, n).act_quant = shared
            n.meta[GROUP_KEY] = group
