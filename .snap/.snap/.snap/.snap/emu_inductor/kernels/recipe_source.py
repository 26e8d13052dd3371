"""NVFP4 activation recipes rendered from `emu_inductor.formats.nvfp4.RECIPES` itself.

The formats describe each recipe once, as three small torch functions (block scale,
element multiplier, dequantization) plus data (`signed_zero`, `negzero_decode`). This
module traces those functions with torch.fx and writes the same operations as Triton
source, op for op, so the kernels compute what `formats.fake_quantize` computes and
never hold a copy of a recipe's formula. An operation it cannot write exactly (an op
outside the small set below, a dtype promotion it does not model) makes the recipe
unsupported: `recipe_unsupported_reason` says why and `render` refuses the spec,
rather than computing something else.

Translation (x, s, g, the block amax `a` are fp32 scalars/tiles in the kernel):
  + - * & comparisons      the same operator;  a / b -> tl.math.div_rn(a, b) (IEEE, as torch)
  torch.clamp(t, lo, hi)   tl.minimum(tl.maximum(t, lo), hi), NaN propagated as torch does
  torch.where              tl.where;   zeros_like / ones_like / full_like -> the literal
  round_to_element(t, E4M3) the rendered E4M3 RNE rounder (_round_e4m3_rne)
  t.to(float32)            nothing (fp32 already), or `.to(tl.float32)` of a comparison
  arithmetic on the amax in the input dtype (`a_x`, compressed-tensors' amax/6): rounded
  to the activation dtype with `_rnd`, as torch rounds a bf16/fp16 op's result.
"""

from __future__ import annotations

import dataclasses
import functools
import operator
from typing import Optional

import torch
import torch.fx

from ..formats import E4M3, IN_DTYPE_ROUNDINGS, NVFP4_RECIPES, round_to_element
from ..formats.nvfp4 import E2M1_MAX

__all__ = ["RecipeNotRenderable", "recipe_lines", "recipe_unsupported_reason"]

# fp32(1/6) is the rendered module's SIXTH constant (render.py); the recipes use it as a
# multiplier (vLLM, TE), so the rendered text names it
_SIXTH = 1.0 / E2M1_MAX

_BINOPS = {operator.mul: ("*", 4), operator.add: ("+", 3), operator.sub: ("-", 3), operator.and_: ("&", 2),
           operator.or_: ("|", 1), operator.eq: ("==", 0), operator.ne: ("!=", 0), operator.lt: ("<", 0),
           operator.le: ("<=", 0), operator.gt: (">", 0), operator.ge: (">=", 0)}
_ATOM = 10


class RecipeNotRenderable(ValueError):
    """A recipe operation the kernel template cannot write exactly."""


def _lit(v) -> str:
    if isinstance(v, bool):
        raise RecipeNotRenderable(f"boolean literal {v!r}")
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if v != v:
            return 'float("nan")'
        if v in (float("inf"), float("-inf")):
            return 'float("inf")' if v > 0 else '-float("inf")'
        if v == _SIXTH:
            return "SIXTH"
        r = repr(v)
        return r if ("." in r or "e" in r) else r + ".0"
    raise RecipeNotRenderable(f"literal {v!r} of type {type(v).__name__}")


class _Expr:
    __slots__ = ("text", "prec", "kind", "value")

    def __init__(self, text: str, prec: int, kind: str, value=None):
        # kind: f32 | act (a value of the input dtype, held as fp32) | bool | scalar | none |
        # object (a constant such as an element spec, in `value`) | dtype:f32
        self.text, self.prec, self.kind, self.value = text, prec, kind, value


def _operand(v, env) -> _Expr:
    if isinstance(v, torch.fx.Node):
        return env[v]
    if v is None:
        return _Expr("None", _ATOM, "none")
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return _Expr(_lit(v), 5 if v < 0 else _ATOM, "scalar")  # -448.0 needs no parens after * or +
    return _Expr(repr(v), _ATOM, "object", v)  # a dtype or an element spec: read by the op's own rule


def _paren(e: _Expr, min_prec: int) -> str:
    return e.text if e.prec >= min_prec else f"({e.text})"


def _result_kind(*ops: _Expr) -> str:
    kinds = {o.kind for o in ops if o.kind != "scalar"}
    if kinds <= {"f32"}:
        return "f32"
    if kinds == {"act"}:
        return "act"
    if kinds == {"bool"}:
        return "bool"
    # torch promotes a 0-d fp32 operand *down* to bf16 next to a bf16 tensor, and
    # dimensioned ones up: not modelled, so refuse rather than guess
    raise RecipeNotRenderable(f"mixed operand dtypes {sorted(kinds)}")


def _act_round(text: str, kind: str) -> _Expr:
    # an op on input-dtype values: torch computes it in fp32 and rounds to the dtype once
    return _Expr(f"_rnd({text})", _ATOM, "act") if kind == "act" else _Expr(text, _ATOM, kind)


def _node_expr(n: torch.fx.Node, env) -> _Expr:
    args = [_operand(a, env) for a in n.args]
    kw = {k: _operand(v, env) for k, v in n.kwargs.items()}
    t = n.target
    if n.op == "call_function" and t in _BINOPS:
        if kw or len(args) != 2:
            raise RecipeNotRenderable(f"{t.__name__} with {len(args)} arguments")
        sym, p = _BINOPS[t]
        l, r = args
        cmp = p == 0
        kind = "bool" if cmp or sym in ("&", "|") else _result_kind(l, r)
        text = f"{_paren(l, p)} {sym} {_paren(r, p + 1)}"
        if kind == "act":
            return _act_round(text, kind)
        return _Expr(text, p, kind)
    if n.op == "call_function" and t is operator.truediv:
        l, r = args
        kind = _result_kind(l, r)
        return _act_round(f"tl.math.div_rn({l.text}, {r.text})", kind) if kind == "act" else \
            _Expr(f"tl.math.div_rn({l.text}, {r.text})", _ATOM, kind)
    if n.op == "call_function" and t is operator.neg:
        (x,) = args
        return _Expr(f"-{_paren(x, _ATOM)}", 5, x.kind)
    if n.op == "call_function" and t is torch.clamp:
        x = args[0]
        lo = kw.get("min", args[1] if len(args) > 1 else None)
        hi = kw.get("max", args[2] if len(args) > 2 else None)
        lo = None if lo is None or lo.kind == "none" else lo
        hi = None if hi is None or hi.kind == "none" else hi
        if x.kind != "f32" or any(b is not None and b.kind != "scalar" for b in (lo, hi)):
            raise RecipeNotRenderable("clamp of a non-fp32 value or with tensor bounds")
        text = x.text
        if lo is not None:
            text = f"tl.maximum({text}, {lo.text}, propagate_nan=tl.PropagateNan.ALL)"  # as torch.clamp
        if hi is not None:
            text = f"tl.minimum({text}, {hi.text}, propagate_nan=tl.PropagateNan.ALL)"
        return _Expr(text, _ATOM, "f32")
    if n.op == "call_function" and t is torch.where:
        c, a, b = args
        if kw or c.kind != "bool":
            raise RecipeNotRenderable("torch.where without a boolean condition")
        return _Expr(f"tl.where({c.text}, {a.text}, {b.text})", _ATOM, _result_kind(a, b))
    if n.op == "call_function" and t in (torch.zeros_like, torch.ones_like, torch.full_like):
        if set(n.kwargs) - {"dtype"} or ("dtype" in n.kwargs and n.kwargs["dtype"] != torch.float32):
            raise RecipeNotRenderable(f"{t.__name__} with {dict(n.kwargs)}")
        like = args[0]
        v = {torch.zeros_like: 0.0, torch.ones_like: 1.0}.get(t)
        if v is None:
            v = n.args[1]
        if isinstance(v, torch.fx.Node):
            raise RecipeNotRenderable("full_like with a tensor fill value")
        return _Expr(_lit(float(v)), _ATOM if float(v) >= 0 else 5, "f32" if like.kind != "act" else "act")
    if n.op == "call_function" and isinstance(t, type) and dataclasses.is_dataclass(t):
        # fx records a frozen dataclass constant (the E4M3 element spec) as its constructor call
        if any(isinstance(a, torch.fx.Node) for a in (*n.args, *n.kwargs.values())):
            raise RecipeNotRenderable(f"{t.__name__} built from traced values")
        return _Expr(t.__name__, _ATOM, "object", t(*n.args, **n.kwargs))
    if n.op == "call_function" and t is round_to_element:
        if len(n.args) != 2 or args[1].value != E4M3 or n.kwargs:
            raise RecipeNotRenderable("round_to_element other than E4M3 with its default options")
        if args[0].kind != "f32":
            raise RecipeNotRenderable("round_to_element of a non-fp32 value")
        return _Expr(f"_round_e4m3_rne({args[0].text})", _ATOM, "f32")
    if n.op == "call_method" and t == "to":
        x = args[0]
        target = n.args[1] if len(n.args) > 1 else n.kwargs.get("dtype")
        if isinstance(target, torch.fx.Node):  # t.to(u.dtype): u's dtype
            target = env[target].kind
        if target not in (torch.float32, "dtype:f32") or len(n.args) > 2 or set(n.kwargs) - {"dtype"}:
            raise RecipeNotRenderable(f".to({target})")
        if x.kind == "bool":
            return _Expr(f"{_paren(x, _ATOM)}.to(tl.float32)", _ATOM, "f32")
        return _Expr(x.text, x.prec, "f32")  # fp32 already (act values are held as fp32)
    if n.op == "call_function" and t is getattr and n.args[1] == "dtype":
        src = args[0]
        if src.kind != "f32":
            raise RecipeNotRenderable(f"dtype of a {src.kind} value")
        return _Expr("", _ATOM, "dtype:f32")
    raise RecipeNotRenderable(f"operation {n.op} {getattr(t, '__name__', t)!r}")


def _translate(fn, names: dict, kinds: dict, tmp: str) -> tuple[list[str], str]:
    """(temporary assignments, result expression) of `fn` traced with torch.fx."""
    tracer = torch.fx.Tracer(autowrap_functions=(round_to_element,))
    try:
        graph = tracer.trace(fn)
    except Exception as e:  # an untraceable recipe (data-dependent Python control flow, ...)
        raise RecipeNotRenderable(f"not traceable ({type(e).__name__}: {e})") from e
    env: dict = {}
    lines: list[str] = []
    out = None
    for n in graph.nodes:
        if n.op == "placeholder":
            if n.target not in names:
                raise RecipeNotRenderable(f"unexpected argument {n.target!r}")
            env[n] = _Expr(names[n.target], _ATOM, kinds[n.target])
        elif n.op == "output":
            out = _operand(n.args[0], env)
        else:
            e = _node_expr(n, env)
            if len(n.users) > 1 and e.kind != "dtype:f32":  # computed once, as torch does
                name = f"{tmp}{len(lines)}"
                lines.append(f"{name} = {e.text}")
                e = _Expr(name, _ATOM, e.kind)
            env[n] = e
    if out is None or out.kind != "f32":
        raise RecipeNotRenderable(f"result of kind {getattr(out, 'kind', None)}")
    return lines, out.text


# The sign of a zero element (formats.elements.SIGNED_ZERO_MODES). `t * -1.0`, not `-t`:
# Triton negates as 0 - t, which gives +0.0 for a zero. (The shared element rounder
# negates with `-v`, so with "keep" a zero comes out +0.0 where formats keeps -0.0; the
# codegen snapshots pin that text: tests/test_kernels_recipes.py documents it.)
_ZERO_SIGN = {
    "keep": None,
    "lt0": "v = tl.where(v == 0, tl.where(y < 0, tl.abs(v) * -1.0, tl.abs(v)), v)",
    "le0": "v = tl.where(v == 0, tl.where(y > 0, tl.abs(v), tl.abs(v) * -1.0), v)",
    "positive": "v = tl.where(v == 0, tl.abs(v), v)",
}


@functools.lru_cache(maxsize=None)
def recipe_lines(recipe: str, element: str, rounding: str) -> str:
    """Triton statements computing `out` (fake-quantized block values, fp32) from `xb`
    (the block tile), `a` (its amax) and `g` (the global scale) with NVFP4 recipe
    `recipe`, the element rounder `_round_<element>_<rounding>`. RecipeNotRenderable
    if the formats' recipe has an operation the template cannot write exactly."""
    r = NVFP4_RECIPES.get(recipe)
    if r is None:
        raise RecipeNotRenderable(f"unknown NVFP4 recipe {recipe!r}")
    blk_tmp, blk = _translate(r.block_scale, {"a32": "a", "a_x": "a", "g": "g"},
                              {"a32": "f32", "a_x": "act", "g": "f32"}, "s")
    mul_tmp, mul = _translate(r.scale_elements, {"x": "x", "s": "s", "g": "g"},
                              {"x": "f32", "s": "f32", "g": "f32"}, "y")
    deq_tmp, deq = _translate(r.dequant, {"v": "v", "s": "s", "g": "g"}, {"v": "f32", "s": "f32", "g": "f32"}, "d")
    if r.signed_zero not in _ZERO_SIGN:
        raise RecipeNotRenderable(f"signed_zero {r.signed_zero!r}")
    if r.negzero_decode not in ("keep", "positive"):
        raise RecipeNotRenderable(f"negzero_decode {r.negzero_decode!r}")
    lines = ["x = xb", *blk_tmp, f"s = {blk}", *mul_tmp, f"y = {mul}"]
    if rounding in IN_DTYPE_ROUNDINGS:
        # formats.round_to_element rounds y to the activation dtype first for these (the
        # library scales the block in its dtype); without it a value just under a tie in
        # fp32 rounds down where the reference's bf16 y sits on the tie
        lines.append("y = _rnd(y)")
    lines.append(f"v = _round_{element}_{rounding}(y)")
    if _ZERO_SIGN[r.signed_zero]:
        lines.append(_ZERO_SIGN[r.signed_zero])
    if r.negzero_decode == "positive":
        lines.append("v = v + 0.0  # the reader decodes the -0 code as +0.0")
    lines += [*deq_tmp, f"out = {deq}"]
    return "\n".join(lines)


def recipe_unsupported_reason(recipe: Optional[str]) -> Optional[str]:
    """None if the kernels render NVFP4 recipe `recipe` exactly, else why not."""
    try:
        recipe_lines(recipe or "vllm", "e2m1", "rne")
    except RecipeNotRenderable as e:
        return f"NVFP4 recipe {recipe!r}: {e}"
    return None
