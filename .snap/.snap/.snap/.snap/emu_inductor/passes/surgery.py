"""Pattern surgery: turning a traced search function into a shape-agnostic pattern and
composing patterns from pieces.

``build_pattern`` (steps after ``tracing.trace_search``):
  1. replace every size argument (``matching.SHAPE_ARGS`` / ``SIZE_SCALAR_ARGS``) and NaN
     fill constants by ``ANY_SHAPE``, which ``fx_to_pattern`` turns into ``Ignored()``,
     so the same pattern matches static and dynamic shapes (the checks verify sizes);
  2. let constant-only nodes (full, no tensor inputs) match any number of users
     (Inductor CSEs them across chains);
  3. turn float literals at Tensor arguments into ``guards.FloatConst`` and a traced
     identity permutation into ``IdentityDims`` (any rank).
Every other constant (nibble masks, shifts, 1/6, 448, dtypes) stays exact: a near-miss
(wrong mask, other dtype) does not match.

The composition helpers (``substitute``, ``with_users``, ``relax_users``,
``replace_literal``) copy or rewrite pattern trees; cached pieces are shared between
patterns and are only ever copied, never mutated.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from typing import Any, Optional

import torch
from torch._inductor import pattern_matcher as pm

from .runtime_guards import runtime_float_consts
from .matching import ANY_SHAPE, SHAPE_ARGS, SIZE_SCALAR_ARGS
from .tracing import trace_search

__all__ = ["IdentityDims", "build_pattern", "relax_users", "replace_nodes_kwarg", "replace_literal", "with_users",
           "substitute"]

aten = torch.ops.aten


class _IdentityPermMarker:
    """Sentinel for a traced identity permutation (moveaxis(x, -1, -1) in a QDQ)."""

    def __repr__(self):
        return "IDENTITY_PERM"


IDENTITY_PERM = _IdentityPermMarker()


class IdentityDims(pm.PatternExpr):
    """Matches a permutation argument that is the identity of any rank ([0, 1], [0, 1, 2]).

    The QDQ pieces are traced on 2-d inputs, where `moveaxis(x, -1, -1)` leaves
    `permute(x, [0, 1])`; the same code on a [B, S, K] activation leaves [0, 1, 2]. Matching
    "the identity" instead of the traced literal lets one trace serve every rank, while a
    real reordering (which would move the block axis) still fails the match."""

    def _match(self, node, ctx):
        if isinstance(node, (list, tuple)) and all(isinstance(d, int) for d in node) and \
                list(node) == list(range(len(node))):
            return pm.Match(ctx, self)
        return pm.FailedMatch("permutation {} is not the identity", node)

    def __repr__(self):
        return "IdentityDims()"

    def pretty_print(self, pp):
        return "IdentityDims()"



def _sentinelise(gm: torch.fx.GraphModule) -> None:
    for n in gm.graph.nodes:
        if n.op != "call_function":
            continue
        args = list(n.args)
        changed = False
        for pos in SHAPE_ARGS.get(n.target, ()):
            if pos < len(args):
                args[pos] = ANY_SHAPE
                changed = True
        if n.target is aten.permute.default and len(args) > 1 and isinstance(args[1], (list, tuple)) and \
                list(args[1]) == list(range(len(args[1]))):
            args[1] = IDENTITY_PERM
            changed = True
        for pos in SIZE_SCALAR_ARGS.get(n.target, ()):
            if pos < len(args):
                args[pos] = ANY_SHAPE
                changed = True
        for i, a in enumerate(args):
            if isinstance(a, float) and math.isnan(a):
                args[i] = ANY_SHAPE
                changed = True
        if changed:
            n.args = tuple(args)



def _free_constant_users(pattern: pm.PatternExpr, gm: torch.fx.GraphModule) -> None:
    """Nodes with no tensor inputs (full, empty) may be CSE'd across chains: MULTIPLE users."""
    seen = set()

    def walk(p):
        if id(p) in seen:
            return
        seen.add(id(p))
        if isinstance(p, pm.CallFunction):
            flat = list(p.flat_args_kwargs[0])
            if p.fns and p.fns[0] in (aten.full.default, aten.empty.memory_format, aten.zeros.default):
                if not any(isinstance(a, pm.PatternExpr) and not isinstance(a, pm.Ignored) for a in flat):
                    p.users = pm.MULTIPLE
            for a in flat:
                if isinstance(a, pm.PatternExpr):
                    walk(a)

    walk(pattern)


class _DtypeMarker:
    def __repr__(self):
        return "ACT_DTYPE"


def build_pattern(fn: Callable, args: Sequence[Any], argnames: Sequence[str],
                  scalar_workaround: Optional[dict] = None,
                  dtype_kwarg: Optional[tuple] = None) -> pm.PatternExpr:
    """A shape-agnostic pattern for `fn` traced on `args` (placeholders named `argnames`);
    `scalar_workaround` {name: value} turns literal numbers equal to value into KeywordArgs."""
    gm = trace_search(fn, args)
    _sentinelise(gm)
    marker = None
    if dtype_kwarg is not None:  # (dtype, name): that dtype literal becomes KeywordArg(name)
        marker = _DtypeMarker()
        for n in gm.graph.nodes:
            n.args = tuple(marker if a is dtype_kwarg[0] else a for a in n.args)
            n.kwargs = {k: (marker if v is dtype_kwarg[0] else v) for k, v in n.kwargs.items()}
    pat = pm.fx_to_pattern(gm, ignore_types=(type(ANY_SHAPE), torch.device), argnames=list(argnames),
                           scalar_workaround=scalar_workaround)
    _free_constant_users(pat, gm)
    runtime_float_consts(pat)
    replace_literal(pat, IDENTITY_PERM, IdentityDims)
    if marker is not None:
        replace_nodes_kwarg(pat, marker, dtype_kwarg[1])
    if isinstance(pat, pm.CallFunction):
        pat.users = 1  # as a piece inside a bigger pattern, its result has one user
    return pat


def relax_users(pattern: pm.PatternExpr) -> pm.PatternExpr:
    """Let every inner node of `pattern` have extra users (e.g. the sym_size a dynamic
    shape reads off a reshape). Nodes still used elsewhere survive the replacement
    (Match.erase_nodes only erases dead nodes), so this trades a possible duplicate
    computation for matching; use it only where no large intermediate can be kept alive."""
    seen = set()

    def walk(p, top):
        if id(p) in seen:
            return
        seen.add(id(p))
        if isinstance(p, pm.CallFunction):
            if not top:
                p.users = pm.MULTIPLE
            for a in p.flat_args_kwargs[0]:
                if isinstance(a, pm.PatternExpr):
                    walk(a, False)

    walk(pattern, True)
    return pattern


def replace_nodes_kwarg(pattern: pm.PatternExpr, value: Any, name: str) -> pm.PatternExpr:
    """Turn every literal argument equal to `value` into KeywordArg(name) (e.g. a spec string)."""
    return replace_literal(pattern, value, lambda: pm.KeywordArg(name))


def replace_literal(pattern: pm.PatternExpr, value: Any, make: Callable[[], pm.PatternExpr]) -> pm.PatternExpr:
    """Turn every literal argument equal to `value` into the pattern `make()`."""
    seen = set()

    def sub(a):
        if a is value or (isinstance(a, str) and isinstance(value, str) and a == value):
            return make()
        if isinstance(a, (list, tuple)):
            return type(a)(sub(x) for x in a)
        if isinstance(a, pm.PatternExpr):
            walk(a)
        return a

    def walk(p):
        if id(p) in seen:
            return
        seen.add(id(p))
        if isinstance(p, pm.CallFunction):
            p.args = tuple(sub(a) for a in p.args)
            p.kwargs = {k: sub(v) for k, v in p.kwargs.items()}
            p.flat_args_kwargs = p.flatten(p.args, p.kwargs)
            for a in p.flat_args_kwargs[0]:
                if isinstance(a, pm.PatternExpr):
                    walk(a)

    walk(pattern)
    return pattern


def with_users(pattern: pm.PatternExpr, users) -> pm.PatternExpr:
    """A shallow copy of `pattern` whose top node may have `users` users (cached pieces
    are shared between patterns and must not be mutated)."""
    p = copy.copy(pattern)
    if isinstance(p, pm._TargetExpr):
        p.users = users
    return p


def substitute(pattern: pm.PatternExpr, subs: dict) -> pm.PatternExpr:
    """A copy of `pattern` with KeywordArg(name) replaced by subs[name] (sub-patterns)."""
    memo: dict = {}

    def sub(a):
        if isinstance(a, pm.KeywordArg) and a.name in subs:
            return subs[a.name]
        if isinstance(a, (list, tuple)):
            return type(a)(sub(x) for x in a)
        if isinstance(a, pm.CallFunction):
            return walk(a)
        return a

    def walk(p):
        if id(p) in memo:
            return memo[id(p)]
        q = copy.copy(p)
        memo[id(p)] = q
        q.args = tuple(sub(a) for a in p.args)
        q.kwargs = {k: sub(v) for k, v in p.kwargs.items()}
        q.flat_args_kwargs = q.flatten(q.args, q.kwargs)
        return q

    return walk(pattern) if isinstance(pattern, pm.CallFunction) else sub(pattern)
