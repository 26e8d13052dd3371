"""Pattern family "moe" (order 20, after "grouped_mm"): whole MoE layers.

The MoE structure around two `mxemu::grouped_mm` calls (fused by "grouped_mm") (routing prep ->
GEMM1 -> activation -> GEMM2 -> top-k combine, as `emu_inductor.patterns.moe` writes
it) becomes one `mxemu::moe`. The two GEMMs' spec strings are KeywordArgs: one pattern
per (activation, router weight on input, expert_map) serves every scheme; the check
requires both GEMMs to use the same scheme. With biased grouped GEMMs (both carrying a
per-expert bias) the same structure becomes `mxemu::moe(..., w13_bias, w2_bias)`.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Optional

import torch
from torch._inductor import pattern_matcher as pm

from ..patterns import checks
from ..patterns import opaque as declared
from ..patterns.moe import TRACE_NUM_EXPERTS, moe_grouped_structure
from ..spec.activations import ACTIVATION_NAMES, is_gated
from ..spec.opspec import OpSpec
from .grouped_mm import bias_reason
from .matching import sym_eq
from .pieces import match_val
from .registry import register_pattern_family
from .surgery import build_pattern, relax_users, replace_nodes_kwarg
from .guards import register_family_pattern
from .tracing import tracing_context

log = logging.getLogger("emu_inductor.passes.moe")

aten = torch.ops.aten
FAMILY = "moe"

__all__ = ["register_moe_patterns", "moe_structure_pattern", "MOE_ACTIVATIONS"]

#: Every activation the ops implement has a structure pattern.
MOE_ACTIVATIONS = ACTIVATION_NAMES
_SPEC1 = OpSpec("nvfp4", "block", "nvfp4", None, "vllm").to_str()
_SPEC2 = OpSpec("nvfp4", "block", "nvfp4", None, "vllm_ref").to_str()
_MOE_ARGS = ["hidden_states", "topk_weights", "topk_ids", "expert_map", "w13", "w13_scale", "w13_alpha", "a1_gs",
             "w2", "w2_scale", "w2_alpha", "a2_gs", "w13_bias", "w2_bias"]



def _moe_example(activation, with_map, bias=False):
    E, H, I, T, k = TRACE_NUM_EXPERTS, 32, 16, 4, 2
    N1 = 2 * I if is_gated(activation) else I
    x = torch.randn(T, H).to(torch.bfloat16)
    tw = torch.rand(T, k)
    ids = torch.randint(0, E, (T, k), dtype=torch.int32)
    emap = torch.arange(E, dtype=torch.int32) if with_map else None
    u8 = torch.uint8
    w13, s13 = torch.zeros(E, N1, H // 2, dtype=u8), torch.ones(E, N1, H // 16).to(torch.float8_e4m3fn)
    w2, s2 = torch.zeros(E, H, I // 2, dtype=u8), torch.ones(E, H, I // 16).to(torch.float8_e4m3fn)
    one = torch.ones(E)
    g = torch.ones(())
    b13 = torch.zeros(E, N1, dtype=torch.bfloat16) if bias else None
    b2 = torch.zeros(E, H, dtype=torch.bfloat16) if bias else None
    return [x, tw, ids, emap, w13, s13, one, g, w2, s2, one.clone(), g.clone(), b13, b2]


@functools.lru_cache(maxsize=None)
def moe_structure_pattern(activation: str, rwoi: bool, with_map: bool, bias: bool = False) -> pm.PatternExpr:
    with tracing_context():
        args = _moe_example(activation, with_map, bias)
        names = [n for n, a in zip(_MOE_ARGS, args) if a is not None]
        present = [a for a in args if a is not None]

        def fn(*vals):
            it = iter(vals)
            full = [next(it) if a is not None else None for a in args]
            x, tw, ids, emap, w13, s13, a13, g1, w2, s2, a2, g2, b13, b2 = full

            def gemm1(a, offs):
                if b13 is not None:
                    return torch.ops.mxemu.grouped_mm(a, w13, s13, a13, offs, g1, _SPEC1, b13)
                return torch.ops.mxemu.grouped_mm(a, w13, s13, a13, offs, g1, _SPEC1)

            def gemm2(a, offs):
                if b2 is not None:
                    return torch.ops.mxemu.grouped_mm(a, w2, s2, a2, offs, g2, _SPEC2, b2)
                return torch.ops.mxemu.grouped_mm(a, w2, s2, a2, offs, g2, _SPEC2)

            return moe_grouped_structure(x, tw, ids, emap, gemm1, gemm2, E=TRACE_NUM_EXPERTS,
                                         activation=activation, apply_router_weight_on_input=rwoi)

        pat = build_pattern(fn, present, names, scalar_workaround={"num_experts": TRACE_NUM_EXPERTS})
    replace_nodes_kwarg(pat, _SPEC1, "spec1")
    replace_nodes_kwarg(pat, _SPEC2, "spec2")
    # routing prep is shared with shape computations under dynamic shapes (sym_size
    # users); the big tensors (dequantized weights) were already absorbed by stage 1
    return relax_users(pat)


def _moe_bias_reason(match) -> Optional[str]:
    x, w13 = match_val(match, "hidden_states"), match_val(match, "w13")
    E = w13.shape[0]
    return bias_reason("w13_bias", match_val(match, "w13_bias"), x.dtype, E, w13.shape[1]) or \
        bias_reason("w2_bias", match_val(match, "w2_bias"), x.dtype, E, x.shape[-1])


def _moe_check(activation, rwoi, with_map, bias=False):
    def check(match):
        kw = match.kwargs
        s1, s2 = kw.get("spec1"), kw.get("spec2")
        if not isinstance(s1, str) or not isinstance(s2, str):
            return "GEMM specs are not constants"
        o1, o2 = OpSpec.from_str(s1), OpSpec.from_str(s2)
        if o1 != o2:
            return f"GEMM1 ({o1.short_name()}) and GEMM2 ({o2.short_name()}) use different schemes"
        x = match_val(match, "hidden_states")
        r = checks.check_activation_input(x, sym_eq, dtypes=(torch.bfloat16,))
        if r:
            return r
        w13, w2 = match_val(match, "w13"), match_val(match, "w2")
        E = kw.get("num_experts")
        if not sym_eq(w13.shape[0], E) or not sym_eq(w2.shape[0], E):
            return f"expert count {E} of the routing does not match the weights ({w13.shape[0]}, {w2.shape[0]})"
        ids, tw = match_val(match, "topk_ids"), match_val(match, "topk_weights")
        if ids.dtype not in (torch.int32, torch.int64) or ids.dim() != 2:
            return f"topk_ids are {ids.dtype} {ids.dim()}-d, expected 2-d int32/int64"
        if not tw.is_floating_point() or tw.dim() != 2:
            return f"topk_weights are {tw.dtype}, expected a 2-d float tensor"
        if rwoi and not sym_eq(ids.shape[1], 1):
            return "router weight on input needs top_k == 1"
        if with_map:
            em = match_val(match, "expert_map")
            if em.dtype not in (torch.int32, torch.int64) or em.dim() != 1:
                return f"expert_map is {em.dtype} {em.dim()}-d, expected 1-d int"
        fmt_k = o1.scheme().weight_fmt
        if not sym_eq(fmt_k.logical_size(w13.shape[-1]), x.shape[-1]):
            return "w13's K does not match the hidden size"
        if bias:
            return _moe_bias_reason(match)
        return None
    return check


def register_moe_patterns(pm_pass, activations=MOE_ACTIVATIONS, rwoi_activations=("silu",)) -> int:
    n = 0
    combos = [(a, rwoi, with_map, bias) for bias in (False, True) for a in activations
              for rwoi in ((False, True) if a in rwoi_activations else (False,)) for with_map in (False, True)]
    for activation, rwoi, with_map, bias in combos:
        try:
            pat = moe_structure_pattern(activation, rwoi, with_map, bias)
        except Exception as e:
            log.warning("mxemu moe: no structure pattern for %s/%s/%s/%s: %r", activation, rwoi, with_map,
                        bias, e)
            continue

        def replace(match, activation=activation, rwoi=rwoi, with_map=with_map):
            kw = match.kwargs
            o = OpSpec.from_str(kw["spec1"])
            spec = dataclasses.replace(o, activation=activation, router_weight_on_input=rwoi).to_str()
            names = ["hidden_states", "w13", "w13_scale", "w13_alpha", "w2", "w2_scale", "w2_alpha",
                     "topk_weights", "topk_ids", "a1_gs", "a2_gs", "expert_map", "w13_bias", "w2_bias"]
            args = [kw.get(nm) for nm in names]
            where = [a is not None for a in args]

            def repl(*vals):
                it = iter(vals)
                x, w13, s13, a13, w2, s2, a2, tw, ids, g1, g2, em, b13, b2 = [
                    next(it) if p else None for p in where]
                if b13 is not None or b2 is not None:
                    return torch.ops.mxemu.moe(x, w13, s13, a13, w2, s2, a2, tw, ids, g1, g2, em, spec,
                                               b13, b2)
                return torch.ops.mxemu.moe(x, w13, s13, a13, w2, s2, a2, tw, ids, g1, g2, em, spec)

            match.replace_by_example(repl, [a for a in args if a is not None])

        name = f"{activation}{'_rwoi' if rwoi else ''}{'_expert_map' if with_map else ''}{'_bias' if bias else ''}"
        register_family_pattern(pat, pm_pass, family=FAMILY, name=name,
                                   check=_moe_check(activation, rwoi, with_map, bias), replace=replace)
        n += 1
    return n



# --- family registration -----------------------------------------------------------------------------


def _init_moe(pm_pass, input_device=None):
    register_moe_patterns(pm_pass)


def _register():
    register_pattern_family(
        FAMILY, _init_moe, order=20, replace=True, anchors=(torch.ops.mxemu.grouped_mm,),
        description="routing + mxemu::grouped_mm x2 + activation + combine -> mxemu::moe (stage 2)")


_register()
# a new opaque declaration re-registers the family with "grouped_mm" (as it always has):
# fresh rules at the next pass run
declared.add_listener(_register)
