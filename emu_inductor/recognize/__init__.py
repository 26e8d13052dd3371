"""Recognise microscaling emulation by WHAT IT COMPUTES, not how it is spelled.

For a GEMM node of a post-grad ATen graph (aten.mm / addmm / bmm / _grouped_mm), find
the subgraph that builds each operand (by role: the weight operand's cone of constants
and parameters; the activation operand's cone from one float tensor), check that it is
built from allowed ops only, evaluate it at compile time on the CPU on probe data, and
compare it bit for bit with every variant `emu_inductor.formats` defines. Exactly one
variant (or several that need the same kernel) agreeing on every probe is a verdict;
anything else is a `Rejection` whose reason names the probe that told them apart.

API (what the passes layer calls)::

    from emu_inductor.recognize import recognize_weight, recognize_activation, gemm_nodes

    for gemm in gemm_nodes(graph):
        w = recognize_weight(gemm)        # WeightVerdict | Rejection
        a = recognize_activation(gemm)    # ActVerdict | Rejection

WeightVerdict: .variant (WeightVariant: fmt, nibble_order, fp6_layout, e8m0_byte255 /
  e8m0_byte0, alpha_order none | scale_alpha v*(s*a) | value_scale_alpha (v*s)*a |
  scale_over_global v*(s/g), compute_dtype), .codes / .scale / .alpha (graph nodes),
  .transpose (operand = dequantized [.., N, K] transposed), .out_dtype,
  .kernel_supported / .unsupported_reason, .guards, .equivalent, .separated,
  .seconds, .cached, .reference(codes, scale, alpha).
ActVerdict: .variant (ActVariant: kind none | mx | nvfp4 | fp8_tensor, fmt, scale_mode,
  recipe, rounding, e8m0_byte0, static), .x (the quantized activation), .global_scale
  (node or None), .output (the QDQ result), .post (row gathers / leading reshapes to the
  operand), .act_quant() (spec ActQuant for an OpSpec), .kernel_supported, .guards, ...
Rejection: .side, .reason (explain() text), .seconds.

Guards: `verdict.guards` lists graph inputs whose VALUES the verdict relied on (a LUT
held in a buffer, a float constant made an input by dynamic=True); the pass must assert
each at run time (`_assert_async` on its bits) or not fuse.

Layering: imports emu_inductor.formats, .reference / .spec, torch; never passes, ops,
codegen or backend. docs/recognize.md explains probes, the soundness argument and limits.
"""

from .api import CACHE, recognize_activation, recognize_weight
from .asserts import assertion_only, feeds_only_asserts
from .candidates import gemm_nodes, operands
from .variants import NO_ACT, ActVariant, WeightVariant, act_variants, weight_variants
from .verdict import ActVerdict, Guard, Rejection, WeightVerdict

__all__ = [
    "recognize_weight", "recognize_activation", "gemm_nodes", "operands", "CACHE", "WeightVerdict", "ActVerdict",
    "Rejection", "Guard", "WeightVariant", "ActVariant", "NO_ACT", "act_variants", "weight_variants",
    "assertion_only", "feeds_only_asserts",
]
