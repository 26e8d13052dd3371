"""Opaque user ops with a known format's semantics.

vLLM wraps AMD Quark's `dq_mxfp4` / `qdq_mxfp4` as custom ops
(`torch.ops.vllm.dequant_mxfp4(x, scale, float_dtype)`, `quant_dequant_mxfp4(x, "even")`);
Dynamo never sees inside them. Declaring such an op here lets the passes treat a call
to it exactly like a traced dequant / QDQ of that format, so GEMMs built on it fuse too:

    emu_inductor.register_dequant_op(torch.ops.vllm.dequant_mxfp4.default, "mxfp4")
    emu_inductor.register_qdq_op(torch.ops.vllm.quant_dequant_mxfp4.default, "mxfp4",
                                 scale_mode="even")

The declaration is a promise by the caller: the op must compute the format's reference
semantics bit for bit (e.g. Quark's HIP dequant = the reference for E8M0 bytes 1..254;
Quark's "even" QDQ with RNE elements = scale_mode "even"). Arguments are located by
position (schema order; keyword and defaulted arguments are bound through the op's
schema): `weight_arg`/`scale_arg`/`alpha_arg` for dequant ops, `input_arg` and
`global_scale_arg` for QDQ ops; the output dtype of a dequant op is read from the
graph, not from its arguments. Further knobs:

  requires        {position: constant}: the declaration holds only for calls whose
                  argument there is that compile-time constant (e.g. a format or mode
                  string); any other call is left as written, with the reason.
  scale_mode_arg  (MX QDQ ops) the position of a string argument naming the scale mode
                  ("even" / "floor" / "rceil"), read from each call.
  e8m0            (MX dequant ops) how the op reads E8M0 scale bytes: "reference"
                  (2^(u-127), byte 255 = NaN, as the fused ops) or "exp2" (the same for
                  bytes 0..254, byte 255 -> inf, e.g. `exp2(u - 127)`, Quark's HIP
                  dequant); both fuse, "exp2" only differs for the NaN byte.
The passes rebuild their opaque patterns, and the pass uuid (FX-cache key) changes,
whenever a declaration is added or cleared.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import torch

from ..formats import BlockFormat, get_format
from ..spec.schemes import ActQuant

__all__ = ["OpaqueDequant", "OpaqueQDQ", "register_dequant_op", "register_qdq_op", "dequant_ops", "qdq_ops",
           "clear", "fingerprint", "add_listener"]


@dataclasses.dataclass(frozen=True)
class OpaqueDequant:
    op: Any  # an OpOverload
    fmt: BlockFormat
    weight_arg: int = 0
    scale_arg: int = 1
    alpha_arg: Optional[int] = None
    fp6_layout: str = "quark"
    requires: tuple = ()  # ((position, constant), ...)
    e8m0: str = "reference"

    @property
    def name(self) -> str:
        return f"opaque[{self.op}]"


@dataclasses.dataclass(frozen=True)
class OpaqueQDQ:
    op: Any
    act: ActQuant
    input_arg: int = 0
    global_scale_arg: Optional[int] = None
    requires: tuple = ()
    scale_mode_arg: Optional[int] = None

    @property
    def name(self) -> str:
        return f"opaque[{self.op}]"

    @property
    def has_global_scale(self) -> bool:
        return self.global_scale_arg is not None

    @property
    def key(self) -> str:
        return self.name


_DEQUANT: dict = {}
_QDQ: dict = {}
_VERSION = [0]
_LISTENERS: list = []  # called after every change (the passes rebuild their families)


def add_listener(fn) -> None:
    """`fn()` runs after every registration / clear (used by emu_inductor.passes)."""
    if fn not in _LISTENERS:
        _LISTENERS.append(fn)


def _changed() -> None:
    _VERSION[0] += 1
    for fn in list(_LISTENERS):
        fn()


def _requires(requires) -> tuple:
    if not requires:
        return ()
    out = []
    for pos, val in dict(requires).items():
        if not isinstance(pos, int) or pos < 0:
            raise ValueError(f"requires: positions must be non-negative ints, got {pos!r}")
        if not isinstance(val, (str, int, float, bool, torch.dtype)) and val is not None:
            raise ValueError(f"requires: argument {pos} must be a str/int/float/bool/dtype/None constant, got {val!r}")
        out.append((pos, val))
    return tuple(sorted(out, key=lambda t: t[0]))


def _check_positions(op, **positions) -> None:
    n = len(op._schema.arguments)
    for name, pos in positions.items():
        if pos is not None and (not isinstance(pos, int) or not 0 <= pos < n):
            raise ValueError(f"{name}={pos!r}: {op} takes {n} arguments ({op._schema})")


def fingerprint() -> str:
    """A stable text of every declaration (hashed into the pass uuid)."""
    lines = []
    for d in _DEQUANT.values():
        lines.append(f"dequant {d.op} {d.op._schema} {d.fmt.name} w={d.weight_arg} s={d.scale_arg} "
                     f"a={d.alpha_arg} fp6={d.fp6_layout} req={d.requires!r} e8m0={d.e8m0}")
    for q in _QDQ.values():
        a = q.act
        lines.append(f"qdq {q.op} {q.op._schema} {a.kind} {a.fmt.name if a.fmt else '-'} {a.scale_mode} "
                     f"{a.recipe} {a.rounding} x={q.input_arg} gs={q.global_scale_arg} req={q.requires!r} "
                     f"mode_arg={q.scale_mode_arg}")
    return "\n".join(sorted(lines))


def _overload(op):
    if isinstance(op, torch._ops.OpOverloadPacket):
        return op.default
    if not isinstance(op, torch._ops.OpOverload):
        raise ValueError(f"op: expected a torch.ops OpOverload (e.g. torch.ops.ns.name.default), got {op!r}")
    return op


def register_dequant_op(op, fmt, *, weight_arg: int = 0, scale_arg: int = 1, alpha_arg: Optional[int] = None,
                        fp6_layout: str = "quark", requires=None, e8m0: str = "reference") -> OpaqueDequant:
    """Declare that `op(...)` dequantizes packed `fmt` weights like the reference does:
    `op(w uint8 [.., N, K*bits/8], scale [.., N, K/block], ...) -> [.., N, K]` equal to
    `emu_inductor.reference.dequantize_weight(w, scale, fmt, alpha=alpha, dtype=out.dtype)`.
    Without `alpha_arg` an NVFP4 op is taken to apply no global scale (alpha = 1)."""
    op = _overload(op)
    fmt = get_format(fmt)
    _check_positions(op, weight_arg=weight_arg, scale_arg=scale_arg, alpha_arg=alpha_arg)
    if alpha_arg is not None and not fmt.has_global_scale:
        raise ValueError(f"alpha_arg: {fmt.name} has no global scale")
    if e8m0 not in ("reference", "exp2"):
        raise ValueError(f"e8m0: expected 'reference' or 'exp2', got {e8m0!r}")
    d = OpaqueDequant(op, fmt, weight_arg, scale_arg, alpha_arg, fp6_layout, _requires(requires), e8m0)
    _DEQUANT[op] = d
    _changed()
    return d


def register_qdq_op(op, fmt, *, scale_mode: Optional[str] = None, recipe: Optional[str] = None,
                    rounding: str = "rne", input_arg: int = 0, global_scale_arg: Optional[int] = None,
                    requires=None, scale_mode_arg: Optional[int] = None) -> OpaqueQDQ:
    """Declare that `op(...)` fake-quantizes activations like `fake_quantize(x, fmt, ...)`
    (`emu_inductor.reference.act_fake_quantize`), returning x's shape and dtype;
    fmt "fp8" means per-tensor dynamic E4M3 (vLLM a_fp8). NVFP4 needs `global_scale_arg`
    (the quantize-direction activation global scale)."""
    op = _overload(op)
    _check_positions(op, input_arg=input_arg, global_scale_arg=global_scale_arg, scale_mode_arg=scale_mode_arg)
    if fmt == "nvfp4" and global_scale_arg is None:
        raise ValueError("global_scale_arg: an NVFP4 activation QDQ takes a global scale")
    if scale_mode_arg is not None and (fmt == "fp8" or not get_format(fmt).is_mx):
        raise ValueError("scale_mode_arg: only MX formats have scale modes")
    if fmt == "fp8":
        act = ActQuant("fp8_tensor")
    else:
        f = get_format(fmt)
        if f.is_mx:
            act = ActQuant("block", f, scale_mode=scale_mode or "even", rounding=rounding)
        else:
            act = ActQuant("block", f, recipe=recipe or "vllm", rounding=rounding)
    q = OpaqueQDQ(op, act, input_arg, global_scale_arg, _requires(requires), scale_mode_arg)
    _QDQ[op] = q
    _changed()
    return q


def dequant_ops() -> list[OpaqueDequant]:
    return list(_DEQUANT.values())


def qdq_ops() -> list[OpaqueQDQ]:
    return list(_QDQ.values())


def version() -> int:
    """Bumps on every registration (the passes rebuild their opaque patterns and uuid)."""
    return _VERSION[0]


def clear() -> None:
    _DEQUANT.clear()
    _QDQ.clear()
    _changed()
