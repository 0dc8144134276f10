"""quantize_products: a product of two tensors (``a * b``, ``torch.mul``, ``a @ b``, ``torch.matmul``, ``bmm``)
becomes a :class:`quantfx.nn.QuantProduct` on the accumulator grid.

Each operand is walked back through quantization-invariant ops to the activation quantizer that produced it (an
operand with none gets a QuantIdentity on its edge), and the product node takes both quantizers as graph
arguments, ``self.mul(a, b, a_quantizer=..., b_quantizer=...)``: in eval mode it multiplies the operands'
integers exactly and scales the result by ``s_a x s_b`` (scale of the product's grid, zero point 0), and the
activation quantizer after it requantizes, as integer runtimes do (a squeeze-excitation gate ``x * sigmoid(.)``,
the matmuls of attention). Products with a Python scalar or a parameter (a layer scale) are left as they are,
and so are products the user keeps float: ``overrides={'<node name>': None}`` (the name of the product's node
as ``print(qmodel.graph)`` shows it before this pass, ``mul``, ``matmul_1``: the QuantProduct module's name). The hard-swish product that approximate_activations writes
in the DPU's arithmetic stays as it is."""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import fx

from quantfx.graph import is_act_quant, producer, scales_by_constant, tensor_product_op, unique_name
from quantfx.nn import QuantProduct
from quantfx.pass_infra import PassResult

from .approximate_activations import APPROX_KEY
from .base import ProfilePass
from .swap_modules import FLOAT


@dataclass(frozen=True)
class QuantizeProducts(ProfilePass):
    name = "quantize_products"
    runs_code = False  # reads and edits the graph only
    needs_profile = False  # without one, requantizers are plain 8-bit QuantIdentity
    overrides: dict = field(default_factory=dict, hash=False)

    def call(self, gm: fx.GraphModule) -> PassResult:
        taken: set = set()
        modified = False
        for node in list(gm.graph.nodes):
            op = tensor_product_op(node)
            if op is None or node.meta.get(APPROX_KEY) or scales_by_constant(gm, node):
                continue  # not a product of two activations, or a hard-swish in the DPU's arithmetic
            if node.name in self.overrides and self.overrides[node.name] is None:
                node.meta[FLOAT] = True
                continue
            quantizers = []
            for i, operand in enumerate(node.args[:2]):
                src = producer(gm, operand)
                if not is_act_quant(gm, src):
                    src = self.requantize(gm, operand, f"{node.name}_operand{i}_quant", taken, users=[node])
                quantizers.append(src)
            if any(not self._per_tensor(gm, q) for q in quantizers):
                continue  # a per-channel operand: the product stays a float op (a float island)
            name = unique_name(gm, node.name, taken)
            gm.add_submodule(name, QuantProduct(op))
            a, b = node.args[:2]
            with gm.graph.inserting_before(node):  # the module is named after the node (its target)
                links = [gm.graph.get_attr(f"{q.target}.act_quant") for q in quantizers]
                new = gm.graph.call_module(name, (a, b), {"a_quantizer": links[0], "b_quantizer": links[1]})
            new.meta.update({k: v for k, v in node.meta.items() if k != FLOAT})
            node.replace_all_uses_with(new)
            gm.graph.erase_node(node)
            modified = True
        return PassResult(gm, modified)  # the pass manager recompiles and lints a modified graph

    @staticmethod
    def _per_tensor(gm, node) -> bool:
        q = gm.get_submodule(node.target).act_quant
        return q.is_quant_enabled and not q.scaling_per_output_channel
