"""Rendered helper functions of the kernel template (`render`): rounding, element decode,
E8M0 / E4M3 scales, the activation fake-QDQ of each scheme, the MoE activations, the
weight-tile loader. Each function returns Triton source text built from the format
objects of `emu_inductor.formats`; `render` assembles them with the kernel bodies.
"""

from __future__ import annotations

import math
import textwrap

import torch

from ..formats import FORMATS, E4M3, IN_DTYPE_ROUNDINGS, ElementSpec, log2_floor_runs
from ..formats.nvfp4 import E4M3_MAX as _E4M3_MAX
from ..formats.spec import BlockFormat
from ..spec.activations import SWIGLUOAI_ALPHA, SWIGLUOAI_LIMIT, activation_function, gate_up_layout, is_gated
from .kernel_spec import KernelSpec
from .recipe_source import RecipeNotRenderable, recipe_lines

_TL_DTYPE = {"bf16": "tl.bfloat16", "fp16": "tl.float16", "fp32": "tl.float32"}


def _f(x: float) -> str:
    """A float literal that round-trips exactly (fp32 values only are used)."""
    r = repr(float(x))
    return r if ("." in r or "e" in r or "inf" in r or "nan" in r) else r + ".0"


def _ind(src: str, n: int = 4) -> str:
    return textwrap.indent(src, " " * n)


# --- numeric helpers ----------------------------------------------------------------------


def _rnd_helper(spec: KernelSpec) -> str:
    if spec.dtype == "fp32":
        body = "return x"
    elif spec.dtype == "bf16" and spec.interpret:
        # exact RNE fp32 -> bf16 on the bit pattern (the interpreter's cast truncates)
        body = ("b = x.to(tl.int32, bitcast=True)\n"
                "b = (b + 0x7FFF + ((b >> 16) & 1)) & -65536\n"
                "return b.to(tl.float32, bitcast=True)")
    else:
        body = f"return x.to({_TL_DTYPE[spec.dtype]}).to(tl.float32)"
    return f"@triton.jit\ndef _rnd(x):\n    # round fp32 to {spec.dtype} (RNE), returned as fp32\n{_ind(body)}\n"


def _dot_helper(spec: KernelSpec) -> str:
    if spec.interpret or spec.dtype == "fp32":
        body = ("return tl.dot(a, b, acc, input_precision=\"ieee\")")
        cast = "return x"
        wq = "return _opnd(_rnd(x))"
        raw = "return x.to(tl.float32)"
    else:
        body = "return tl.dot(a, b, acc)"
        cast = f"return x.to({_TL_DTYPE[spec.dtype]})"
        wq = cast  # one RNE cast gives the rounded operand (no round trip through fp32)
        raw = cast  # a no-op cast when the tile is stored in the activation dtype
    return (f"@triton.jit\ndef _dot(a, b, acc):\n{_ind(body)}\n\n\n"
            f"@triton.jit\ndef _opnd(x):\n    # a dot operand (values already on the {spec.dtype} grid)\n{_ind(cast)}\n\n\n"
            f"@triton.jit\ndef _opnd_raw(x):\n    # a loaded tile already on the {spec.dtype} grid, as a dot operand\n{_ind(raw)}\n\n\n"
            f"@triton.jit\ndef _wq(x):\n    # fp32 weights rounded (RNE) to {spec.dtype}, as a dot operand\n{_ind(wq)}\n\n\n"
            + _SWAP_HELPERS)


# SWAP=1 computes the transposed product W @ A^T: the dequantized weight tile, made in
# registers, is the dot's left operand (which Hopper's wgmma and mma read from registers),
# so it is not staged through shared memory as a right operand must be; the rows (tokens)
# become the narrow N side. The accumulator is [BN, BM] until `_acc_rows` turns it back.
_SWAP_HELPERS = """@triton.jit
def _acc0(BM: tl.constexpr, BN: tl.constexpr, SWAP: tl.constexpr):
    if SWAP:
        return tl.zeros((BN, BM), dtype=tl.float32)
    else:
        return tl.zeros((BM, BN), dtype=tl.float32)


@triton.jit
def _mma(a, w, acc, SWAP: tl.constexpr):
    # acc += a @ w^T ([BM, BK] x [BN, BK]), or its transpose when SWAP
    if SWAP:
        return _dot(w, tl.trans(a), acc)
    else:
        return _dot(a, tl.trans(w), acc)


@triton.jit
def _acc_rows(acc, SWAP: tl.constexpr):
    # the accumulator as [BM, BN]
    if SWAP:
        return tl.trans(acc)
    else:
        return acc
"""


def _round_elem(el: ElementSpec, rounding: str) -> str:
    if rounding == "rne":
        rnd = "r = (n + 8388608.0) - 8388608.0  # RNE for 0 <= n < 2^22"
    elif rounding in IN_DTYPE_ROUNDINGS:
        # formats.round_in_dtype: microxcaling's floor(|a| + 0.5) with the sum rounded to the
        # activation dtype (_rnd; exact in fp32 first), "even" less its exact-tie mask
        rnd = "r = tl.floor(_rnd(n + 0.5))"
        if rounding == "microxcaling_even":
            rnd += "\nt = n - 0.5  # exact for n >= 1/2; below, never an even integer\n" \
                   "r = r - (t == 2.0 * tl.floor(t * 0.5)).to(tl.float32)"
    elif rounding in ("half_away", "half_toward_zero"):
        # n >= 0 (a magnitude): a tie goes up (away from zero) or stays (toward zero)
        rnd = "f = tl.floor(n)\nr = f + (n - f " + (">=" if rounding == "half_away" else ">") + " 0.5).to(tl.float32)"
    else:  # a rounding rendered as another would compute a different function silently
        raise ValueError(f"rounding: no kernel rendering for {rounding!r}")
    return f"""@triton.jit
def _round_{el.name}_{rounding}(y):
    # round fp32 onto the {el.name} grid (max normal {el.max_normal}, emin {el.emin}), saturating;
    # NaN stays NaN as in torch (a GPU min/max drops NaN unless told to propagate it)
    a = tl.minimum(tl.abs(y), {_f(el.max_normal)}, propagate_nan=tl.PropagateNan.ALL)
    e = ((a.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
    e = tl.minimum(tl.maximum(e, {el.emin}), {el.emax + 1})
    n = a * _pow2({el.mbits} - e)
{_ind(rnd)}
    v = r * _pow2(e - {el.mbits})
    return tl.where(y.to(tl.int32, bitcast=True) < 0, -v, v)
"""


def is_e2m1(el: ElementSpec) -> bool:
    """FP4 E2M1 (no Inf/NaN codes): decoded by bit placement, with a high-nibble variant."""
    return (el.ebits, el.mbits, el.bias) == (2, 1, 1) and not el.has_inf and not el.nan_codes


def _by_bits(el: ElementSpec, c: str, at: int = 0) -> tuple[str, str]:
    """(int32 bits, fp32 factor) of a code of `el` held in bits at..at+el.bits-1 of `c`: its
    exponent and mantissa bits moved to fp32's (mantissa top at bit 22), its sign to bit 31.
    Read as fp32 that is the value times 2^(bias - 127) for every code -- the subnormals too,
    as fp32 subnormals -- so one exact multiply by 2^(127 - bias) finishes it. Codes whose
    exponent field is all ones read as normal numbers: NaN / Inf codes need their own select."""
    mag, sign = ((1 << (el.bits - 1)) - 1) << at, (1 << (el.bits - 1)) << at
    sh_m, sh_s = 23 - el.mbits - at, 31 - (el.bits - 1) - at
    def part(mask, sh):
        m = hex(mask) if mask > 15 else str(mask)
        return f"(({c} & {m}) << {sh})" if sh >= 0 else f"(({c} & {m}) >> {-sh})"
    return f"{part(mag, sh_m)} | {part(sign, sh_s)}", \
        _f(2.0 ** (127 - el.bias))


def _decode(el: ElementSpec, name: str) -> str:
    emask = (1 << el.ebits) - 1
    if is_e2m1(el):
        # E2M1 by bit placement: the magnitude bits (e1 e0 m) go to fp32 bits 24..22, which
        # reads as 2^(e-127) * (1 + m/2) for e >= 1 and as the subnormal m * 2^-127 for e = 0:
        # exactly the E2M1 value times 2^-126 in every case, so one exact multiply by 2^126
        # finishes it (no select for the two subnormal codes); the sign goes to bit 31.
        # `_hi` decodes the high nibble of a byte in place (no shift down first).
        return (f"@triton.jit\n"
                f"def {name}(c):\n"
                f"    # {el.name} codes (int32, low 4 bits) -> fp32 values by bit placement\n"
                f"    b = {_by_bits(el, 'c')[0]}\n"
                f"    return b.to(tl.float32, bitcast=True) * {_by_bits(el, 'c')[1]}\n\n\n"
                f"@triton.jit\n"
                f"def {name}_hi(c):\n"
                f"    # the {el.name} code in bits 4..7 of c -> fp32 value (as {name})\n"
                f"    b = {_by_bits(el, 'c', 4)[0]}\n"
                f"    return b.to(tl.float32, bitcast=True) * {_by_bits(el, 'c', 4)[1]}\n")
    lines = [
        "@triton.jit",
        f"def {name}(c):",
        f"    # {el.name} codes (int32, low {el.bits} bits) -> fp32 values, from the exponent bits",
        f"    ef = (c >> {el.mbits}) & {emask}",
        f"    mt = c & {(1 << el.mbits) - 1}",
        f"    nb = ((ef + {127 - el.bias}) << 23) | (mt << {23 - el.mbits})",
        f"    v = tl.where(ef == 0, mt.to(tl.float32) * {_f(2.0 ** (el.emin - el.mbits))}, nb.to(tl.float32, bitcast=True))",
    ]
    if el.has_inf:
        lines += [
            f"    v = tl.where((ef == {emask}) & (mt == 0), float(\"inf\"), v)",
            f"    v = tl.where((ef == {emask}) & (mt != 0), float(\"nan\"), v)",
        ]
    else:
        for nc in el.nan_codes:
            lines.append(f"    v = tl.where((c & {el.sign_bit - 1}) == {nc}, float(\"nan\"), v)")
    lines.append(f"    return tl.where(((c >> {el.ebits + el.mbits}) & 1) == 1, -v, v)")
    return "\n".join(lines) + "\n"


_E8M0 = """@triton.jit
def _e8m0_decode(u):
    # 2^(u-127); byte 0 -> 2^-127 (subnormal), byte 255 -> NaN
    b = tl.where(u == 0, 0x00400000, u << 23)
    b = tl.where(u == 255, 0x7FC00000, b)
    return b.to(tl.float32, bitcast=True)


@triton.jit
def _e8m0_inverse(u):
    # 2^(127-u), exact; byte 254 -> 2^-127, byte 255 -> NaN
    e = 127 - u
    b = tl.where(e >= -126, tl.maximum(e + 127, 0) << 23, 0x00400000)
    b = tl.where(u == 255, 0x7FC00000, b)
    return b.to(tl.float32, bitcast=True)
"""


_TORCH_DTYPE = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _log2_floor_lines(dtype: str) -> list[str]:
    """floor(log2 amax) with log2 rounded to `dtype` (formats.log2_floor), without a log2:
    the exponent field, +1 when the fraction field reaches its binade's threshold. The
    thresholds are the formats' exact table, written as runs over the exponent field."""
    runs = log2_floor_runs(_TORCH_DTYPE[dtype])
    lines = ["bits = amax.to(tl.int32, bitcast=True)",
             "ef = (bits >> 23) & 0xFF",
             f"# log2 rounded to {dtype} reaches the next integer from fraction field thr on",
             f"thr = tl.where(ef >= {runs[1][0]}, {runs[1][2]}, {runs[0][2]})"]
    lines += [f"thr = tl.where(ef >= {first}, {t}, thr)" for first, _, t in runs[2:]]
    lines.append("e = ef - 127 + ((bits & 0x7FFFFF) >= thr).to(tl.int32)")
    return lines


def _e8m0_scale(el: ElementSpec, mode: str, dtype: str = "fp32") -> str:
    """The E8M0 scale-byte helper for `mode`; `dtype` (the activation dtype) matters only
    to "floor_log2", whose log2 is rounded in it."""
    if mode == "rceil":
        body = f"""d = amax * {_f(1.0 / el.max_normal)}
bits = d.to(tl.int32, bitcast=True)
ef = (bits >> 23) & 0xFF
mant = bits & 0x7FFFFF
u = tl.where(ef == 0, (mant > 4194304).to(tl.int32), ef + (mant != 0).to(tl.int32))
u = tl.minimum(u, 254)"""
    else:
        lines = ["bits = amax.to(tl.int32, bitcast=True)"]
        if mode == "floor_log2":
            lines = _log2_floor_lines(dtype)
        elif mode not in ("floor", "ceil", "even"):
            raise ValueError(f"act_scale_mode: the kernels render floor, ceil, even, rceil and floor_log2; got {mode!r}")
        if mode == "even":
            lines.append(f"bits = (bits + {1 << (22 - el.mbits)}) & 0x7F800000")
        if mode != "floor_log2":
            lines.append("e = ((bits >> 23) & 0xFF) - 127")
        if mode == "ceil":
            lines.append("e = e + ((amax.to(tl.int32, bitcast=True) & 0x7FFFFF) != 0).to(tl.int32)")
        lines.append(f"u = tl.minimum(tl.maximum(e - {el.emax}, -127), 127) + 127")
        body = "\n".join(lines)
    return f"""@triton.jit
def _e8m0_scale(amax):
    # E8M0 scale byte (as int32) of a block amax, scale_mode={mode!r}{f" ({dtype})" if mode == "floor_log2" else ""}, element {el.name}
{_ind(body)}
    finite = ((amax.to(tl.int32, bitcast=True) >> 23) & 0xFF) != 255
    return tl.where(finite, u, 255)
"""


def _mx_inf_amax_lines(op, el: ElementSpec) -> str:
    """The scale byte of an Inf block, or of a finite amax that "even" rounds past 2^127
    (OpSpec.act_inf_amax = formats' inf_amax); "" for the default "nan" (`_e8m0_scale`
    gives 255 for Inf and counts a carry as 2^128, as formats does)."""
    mode = op.act_inf_amax
    if mode == "nan":
        return ""
    if mode == "exponent":
        # an Inf amax's exponent field reads as 2^128, like a carry: byte 128 - emax (clamped)
        if op.act_scale_mode not in ("floor", "ceil", "even"):
            raise ValueError(f"act_inf_amax: 'exponent' is rendered for floor, ceil and even; "
                             f"got act_scale_mode={op.act_scale_mode!r}")
        byte = min(max(128 - el.emax, -127), 127) + 127
        return f"# inf_amax='exponent': an Inf amax counts as 2^128 -> byte {byte}\n" \
               f"u = tl.where(a == float(\"inf\"), {byte}, u)\n"
    byte = 254 if mode == "max" else 255
    if op.act_scale_mode == "even":
        # amax's bits + the rounding increment reach the all-ones exponent: Inf or a carry
        # (NaN keeps 255 from _e8m0_scale)
        return (f"# inf_amax={mode!r}: an Inf amax or a rounding carry past 2^127 -> byte {byte}\n"
                f"top = ((a.to(tl.int32, bitcast=True) + {1 << (22 - el.mbits)}) & 0x7F800000) == 0x7F800000\n"
                f"u = tl.where(top & (a == a), {byte}, u)\n")
    if mode == "nan_or_overflow":
        return ""  # no carry outside "even": the same bytes as "nan"
    return f"# inf_amax='max': an Inf amax -> byte 254 (2^127)\nu = tl.where(a == float(\"inf\"), 254, u)\n"


def _mx_inverse(op) -> str:
    """The multiplier that scales a block into element range (OpSpec.act_byte0_inverse =
    formats' byte0_inverse): exact 2^(127-u), except for byte 0 under min_normal (2^126,
    torchao 0.18's scale clamped to fp32's smallest normal) or one (1.0)."""
    mode = op.act_byte0_inverse
    if mode == "pow2":
        return "_e8m0_inverse(u)"
    mult = {"min_normal": 2.0 ** 126, "one": 1.0}[mode]
    return f"tl.where(u == 0, {_f(mult)}, _e8m0_inverse(u))"


def _signed_zero_lines(mode: str) -> str:
    """The sign of an element that rounds to zero (OpSpec.act_signed_zero = formats'
    signed_zero); `_round_*` keeps the input's sign ("keep"). NaN is never == 0."""
    if mode == "keep":
        return ""
    if mode == "positive":
        zero = "0.0"
    else:  # -0.0 built from its bits: lt0 negative iff y < 0, le0 iff not y > 0
        neg = "y < 0.0" if mode == "lt0" else "y <= 0.0"
        zero = f"(({neg}).to(tl.int32) << 31).to(tl.float32, bitcast=True)"
    return f"# signed_zero={mode!r}\nv = tl.where(v == 0.0, {zero}, v)\n"


def _qdq_helper(spec: KernelSpec) -> str:
    op = spec.op
    if op.act_kind == "none":
        return ("@triton.jit\ndef _qdq_a(x, g, ROWS: tl.constexpr, W: tl.constexpr):\n"
                "    # weight-only scheme: activations are not quantized\n    return x\n")
    if op.act_kind == "fp8_tensor":
        el = E4M3
        return f"""@triton.jit
def _qdq_a(x, s, ROWS: tl.constexpr, W: tl.constexpr):
    # per-tensor E4M3 fake-QDQ (vLLM scaled_fp8_quant): q = e4m3(x * (1/s)), out = q * s
    q = _round_{el.name}_{op.act_rounding}(x * tl.math.div_rn(1.0, s))
    return _rnd(q * s)


@triton.jit
def _fp8_scale(amax):
    # dynamic per-tensor scale: max(amax / {_E4M3_MAX:g}, 1 / ({_E4M3_MAX:g} * 512))
    return tl.maximum(tl.math.div_rn(amax, {_E4M3_MAX!r}), {_f(1.0 / (_E4M3_MAX * 512.0))},
                      propagate_nan=tl.PropagateNan.ALL)
"""
    fmt: BlockFormat = FORMATS[op.act_fmt]
    el = fmt.element
    bs = fmt.block_size
    head = f"""@triton.jit
def _qdq_a(x, g, ROWS: tl.constexpr, W: tl.constexpr):
    # {fmt.name} activation fake-QDQ per row, blocks of {bs} along the tile's last axis
    xb = tl.reshape(x, (ROWS, W // {bs}, {bs}))
    xa = tl.abs(xb)
    # block amax; tl.max skips NaN (GPU and interpreter), torch's amax does not: the sum
    # term is NaN for a block holding a NaN (so the whole block is NaN, as in formats)
    a = (tl.max(xa, axis=2) + tl.sum(tl.where(xa != xa, xa, 0.0), axis=2))[:, :, None]
"""
    if fmt.is_mx:
        # microxcaling's roundings scale the block in the activation dtype (a negative that
        # underflows there is -0.0, whose zero sign is +)
        scaled = f"_rnd(xb * {_mx_inverse(op)})" if op.act_rounding in IN_DTYPE_ROUNDINGS else \
            f"xb * {_mx_inverse(op)}"
        body = f"""    u = _e8m0_scale(a)
{_ind(_mx_inf_amax_lines(op, el))}    y = {scaled}
    v = _round_{el.name}_{op.act_rounding}(y)
{_ind(_signed_zero_lines(op.act_signed_zero))}    out = v * _e8m0_decode(u)
"""
    else:
        # the recipe as `formats` computes it, traced and written op for op (recipe_source)
        try:
            lines = recipe_lines(op.act_recipe or "vllm", el.name, op.act_rounding)
        except RecipeNotRenderable as e:
            raise ValueError(f"act_recipe: the kernels cannot render NVFP4 recipe {op.act_recipe!r} exactly: {e}") from e
        body = _ind(lines) + "\n"
    return head + body + "    return _rnd(tl.reshape(out, (ROWS, W)))\n"


def _act_helper(spec: KernelSpec) -> str:
    act = spec.op.activation
    # the body follows the spec's function and gatedness; where gate and up come from
    # (halves / interleaved) is only the weight rows GEMM1 reads (`_gate_up_rows`)
    fn, gated = activation_function(act), is_gated(act)
    lim, alpha = _f(SWIGLUOAI_LIMIT), _f(SWIGLUOAI_ALPHA)
    silu = "_rnd(tl.math.div_rn(g, 1.0 + tl.exp(-g)))"
    gelu = "_rnd(0.5 * g * (1.0 + tl.math.erf(g * 0.7071067811865476)))"
    if fn == "silu" and gated:
        body = f"return _rnd({silu} * u)"
    elif fn == "gelu" and gated:
        body = f"return _rnd({gelu} * u)"
    elif fn == "swigluoai":
        nan = "propagate_nan=tl.PropagateNan.ALL"  # torch.clamp keeps NaN
        body = (f"g = tl.minimum(g, {lim}, {nan})\n"
                f"u = tl.minimum(tl.maximum(u, -{lim}, {nan}), {lim}, {nan})\n"
                f"t = _rnd(g * {alpha})\n"
                f"sg = _rnd(tl.math.div_rn(1.0, 1.0 + tl.exp(-t)))\n"
                f"return _rnd(_rnd(u + 1.0) * _rnd(g * sg))")
    elif fn == "silu":
        body = f"return {silu}"
    elif fn == "gelu":
        body = f"return {gelu}"
    elif fn == "relu2":
        body = "r = tl.maximum(g, 0.0, propagate_nan=tl.PropagateNan.ALL)\nreturn _rnd(r * r)"
    else:  # pragma: no cover - the spec registry lists no other function
        raise ValueError(f"activation: {act!r}")
    return (f"@triton.jit\ndef _act(g, u):\n    # {act}: the eager {spec.dtype} op order, each op rounded"
            f" (g, u already rounded GEMM outputs)\n{_ind(body)}\n")


def _gate_up_rows(activation: str) -> tuple[str, str]:
    """Weight rows (in terms of output column `cols` and output width NOUT) of gate and up,
    by the spec's gate/up layout (the bias rows and split-K partial sums follow: bias by
    these rows, partial sums by output column)."""
    layout = gate_up_layout(activation)
    if layout == "interleaved":
        return "cols * 2", "cols * 2 + 1"
    if layout == "halves":
        return "cols", "cols + NOUT"
    return "cols", "cols"


def _alpha_load(mode: str) -> str:
    """The weight global scale of each tile row (scalar, or [BN, 1])."""
    if mode == "scalar":
        return "tl.load(alpha_ptr)"
    if mode == "expert":
        return "tl.load(alpha_ptr + e)"
    if mode == "gate_up":
        return "tl.load(alpha_ptr + e * 2 + rows // (NW // 2), mask=rmask, other=1.0)[:, None]"
    return "tl.load(alpha_ptr + e * NW + rows, mask=rmask, other=1.0)[:, None]"


def _alpha_expr(mode: str, order: str = "s*a") -> str:
    """The block-scale line of the NVFP4 decode: s * a, or s / g (OpSpec.w_scale_order);
    "(v*s)*a" multiplies the scaled values instead (`_alpha_post`)."""
    if mode == "none" or order == "(v*s)*a":
        return ""
    if order == "s/g":
        return f"s = tl.math.div_rn(s, {_alpha_load(mode)})"
    return f"s = s * {_alpha_load(mode)}"


def _alpha_post(mode: str, order: str) -> str:
    """(v * s) * a: the global scale applied to the scaled values, in fp32."""
    if mode == "none" or order != "(v*s)*a":
        return ""
    return f"\n    v = v * {_alpha_load(mode)}"


_E8M0_W_INF = """@triton.jit
def _e8m0_decode_w(u):
    # weight scales read as exponent bits: 2^(u-127); byte 0 -> 2^-127, byte 255 -> +inf
    b = tl.where(u == 0, 0x00400000, u << 23)
    b = tl.where(u == 255, 0x7F800000, b)
    return b.to(tl.float32, bitcast=True)
"""

_E8M0_W_LDEXP = """@triton.jit
def _e8m0_decode_w(u):
    # weight scales as torch.ldexp applies them (transformers' gpt-oss): 2^(u-127), byte 0 ->
    # 2^-127; byte 255 -> 2^127 here times 2 in _w_tile, so v * 2^128 stays exact (0 stays 0)
    b = tl.where(u == 0, 0x00400000, u << 23)
    b = tl.where(u == 255, 0x7F000000, b)
    return b.to(tl.float32, bitcast=True)
"""


def fast_decode_kind(spec: KernelSpec, alpha_mode: str) -> str:
    """Which inline-PTX E2M1 weight decode applies to one weight operand (GPU variant, bf16
    activations; the launcher also requires EVEN_K and a CUDA, not ROCm, device):
      "mx": MX E2M1 read with the default E8M0 reader (`E2M1_FAST`: power-of-two scales, the
            bf16 products are exact);
      "nv": E2M1 under E4M3 block scales and one global scale per tensor or expert applied as
            s * a or s / g (`E2M1_NV_FAST`: the fp32 products of the plain decode, fewer
            instructions; per program only while |scale| < 4, `_nv_fast_ok`);
      "":   none (the plain decode)."""
    fmt: BlockFormat = FORMATS[spec.op.weight_fmt]
    if spec.interpret or spec.dtype != "bf16" or fmt.pack_bits != 4 or not is_e2m1(fmt.element):
        return ""
    if fmt.is_mx:  # E2M1_FAST decodes byte 0 as 2^-127 and byte 255 as NaN
        return "mx" if spec.op.w_e8m0_byte255 == "nan" and spec.op.w_e8m0_byte0 == "pow2" else ""
    if (fmt.scale.name == "e4m3" and fmt.block_size % 8 == 0 and alpha_mode in ("scalar", "expert")
            and spec.op.w_scale_order in ("s*a", "s/g")):
        return "nv"
    return ""


def fast_decode_supported(spec: KernelSpec) -> bool:
    """Some weight operand of the spec's kernels has an inline-PTX decode (`fast_decode_kind`)."""
    return any(fast_decode_kind(spec, a) for a in (spec.alpha1, spec.alpha2))


# The MX weight decode as bf16 pairs (offline SASS, benchmarks/sass_loop.py: the GEMM loop
# from 10.7 to 6.7 instructions per weight element). One 32-bit word = 4 checkpoint bytes =
# codes k0..k7 (even k in the low nibble); for byte j the word and the word >> 4 are spread to
# the two 16-bit lanes (prmt), so each lane holds one code in its low nibble; magnitude bits go
# to bf16 bits 6-8 and the sign to bit 15, which reads as value * 2^-126 for every code (the
# subnormal code 1 too), and one exact bf16x2 fma by 2^126 (+ -0: +0 stays +0, -0 stays -0)
# finishes it. Triton hands the asm two int16 elements per call and files output j's two
# halves as elements (2c, 2c+1) of tensor j: they are codes 8c + 2j and 8c + 2j + 1, put back
# in k order by the join / permute below (register renaming, no data movement).
_E2M1_FAST_PAIR = """        prmt.b32 d, $4, x4, {sel};
        shl.b32 t, d, 6; and.b32 t, t, 0x01C001C0; shl.b32 u, d, 12; and.b32 u, u, 0x80008000; or.b32 t, t, u;
        fma.rn.bf16x2 ${j}, t, k, z;
"""
E2M1_FAST = """@triton.jit
def _e2m1_i16_bf16(w, BN: tl.constexpr, BK: tl.constexpr):
    # packed codes read as int16 [BN, BK // 4] -> bf16 values [BN, BK] in k order, exact
    o0, o1, o2, o3 = tl.inline_asm_elementwise(
        asm=\"\"\"{
        .reg .b32 x4, d, t, u, k, z;
        mov.b32 k, 0x7E807E80;
        mov.b32 z, 0x80008000;
        shr.b32 x4, $4, 4;
""" + "".join(_E2M1_FAST_PAIR.format(j=j, sel=f"0x0{4 + j}0{j}") for j in range(4)) + """        }\"\"\",
        constraints="=r,=r,=r,=r,r", args=[w], dtype=(tl.bfloat16, tl.bfloat16, tl.bfloat16, tl.bfloat16),
        is_pure=True, pack=2)
    return _words_in_k_order(o0, o1, o2, o3, BN, BK)
"""
# the join / permute both inline decodes end with (rendered once with either)
WORDS_IN_K_ORDER = """@triton.jit
def _words_in_k_order(o0, o1, o2, o3, BN: tl.constexpr, BK: tl.constexpr):
    # output j of the asm holds codes 8c + 2j and 8c + 2j + 1 as its elements (2c, 2c + 1)
    a = tl.join(tl.join(o0, o2), tl.join(o1, o3))  # [BN, BK // 4, 2, 2] = (c, r, j) once reshaped
    a = tl.reshape(a, (BN, BK // 8, 2, 4))
    return tl.reshape(tl.permute(a, (0, 1, 3, 2)), (BN, BK))  # (c, j, r): k = 8c + 2j + r
"""


def _nv_code_lines(dst: str, src: str, nibble: int) -> str:
    """PTX: the E2M1 code in nibble `nibble` of `src` with its bits where `_decode` puts them
    (magnitude at fp32 bits 22..24, sign at 31: value * 2^-126), times the block scale * 2^126
    ($5): one fp32 rounding of value * scale, as the plain decode's product. The isolated code
    times 2^a + 2^b is two copies of it at bits 22..25 and 28..31 (disjoint: no carries), from
    which the mask keeps the magnitude of the first and the sign of the second."""
    a, b = 22 - 4 * nibble, 28 - 4 * nibble
    assert a >= 0, "nibbles above 5 are shifted down first"
    return (f"        and.b32 {dst}, {src}, {hex(0xF << 4 * nibble)}; mul.lo.u32 {dst}, {dst}, {hex((1 << a) + (1 << b))}; "
            f"and.b32 {dst}, {dst}, 0x81C00000; mul.rn.f32 {dst}, {dst}, $5;\n")


def _nv_pair_lines(j: int) -> str:
    """Byte j of the word $4 (bytes 3 read from $4 >> 8 as byte 2): its two codes decoded
    and rounded to a bf16 pair in output $j (low half: the low nibble, the even k)."""
    src, byte = ("y", 2) if j == 3 else ("$4", j)
    return (_nv_code_lines("lo", src, 2 * byte) + _nv_code_lines("hi", src, 2 * byte + 1)
            + f"        cvt.rn.bf16x2.f32 ${j}, hi, lo;\n")


# The NVFP4 weight decode on whole 32-bit words (8 codes, all in one 16-element block): per
# code three integer ops put its bits where `_decode` puts them, one mul.rn.f32 by the block
# scale * 2^126 (`_nv_fast_ok` keeps that finite and exact) gives the plain decode's fp32
# product, and cvt.rn.bf16x2.f32 rounds two of them as `_wq` does: bit-identical to the plain
# decode with no byte unpacking, interleave or per-element scale broadcast (offline SASS,
# benchmarks/sass_loop.py: see docs/kernels.md). Outputs are filed as in `E2M1_FAST`.
E2M1_NV_FAST = """@triton.jit
def _e2m1_i16_nv(w, sp, BN: tl.constexpr, BK: tl.constexpr):
    # packed codes read as int16 [BN, BK // 4] and each word's block scale * 2^126 (fp32,
    # [BN, BK // 4]) -> bf16(value * scale) [BN, BK] in k order
    o0, o1, o2, o3 = tl.inline_asm_elementwise(
        asm=\"\"\"{
        .reg .b32 lo, hi, y;
        shr.b32 y, $4, 8;
""" + "".join(_nv_pair_lines(j) for j in range(4)) + """        }\"\"\",
        constraints="=r,=r,=r,=r,r,r,r", args=[w, sp], dtype=(tl.bfloat16, tl.bfloat16, tl.bfloat16, tl.bfloat16),
        is_pure=True, pack=2)
    return _words_in_k_order(o0, o1, o2, o3, BN, BK)
"""


def scale_by_bits(el: ElementSpec) -> str:
    """`_scale_by_bits`: block-scale bytes of element `el` (E4M3 for NVFP4) -> fp32 by bit
    placement (`_by_bits`) and a select for its NaN codes -- a few bit operations where the
    generic `_decode` selects between the normal and subnormal forms; no fp8 cast (Ampere has
    no fp8 conversion)."""
    assert not el.has_inf and not el.inf_codes, "Inf codes would need a select too"
    bits, factor = _by_bits(el, "u")
    nan = " | ".join(f"((u & {(1 << (el.bits - 1)) - 1}) == {c & ((1 << (el.bits - 1)) - 1)})" for c in el.nan_codes)
    body = f"v = ({bits}).to(tl.float32, bitcast=True) * {factor}"
    body += f"\n    return tl.where({nan}, float(\"nan\"), v)" if nan else "\n    return v"
    return (f"@triton.jit\ndef _scale_by_bits(u):\n    # {el.name} scale bytes (int32) -> fp32, exact; NaN codes "
            f"{', '.join(hex(c) for c in el.nan_codes)} (either sign) -> NaN\n    {body}\n")


# The inline NVFP4 decode multiplies by scale * 2^126, which is finite and exact while
# |scale| < 4 (2^126 * 4 is past fp32's largest value); block scales are at most the scale
# element's max normal, so a global scale a (s * a) with |a| <= NV_FAST_MAX_A -- and g (s / g)
# with |g| >= NV_FAST_MIN_G -- keeps every block of the expert there. Powers of two, exact.
def _pow2_floor(x: float) -> float:
    return 2.0 ** math.floor(math.log2(x))


def _nv_fast_limits(el: ElementSpec) -> tuple[float, float]:
    """(max |a|, min |g|) of the inline NVFP4 decode for block scales of element `el`."""
    a = _pow2_floor(4.0 / el.max_normal)
    while el.max_normal * a >= 4.0:  # strictly below 4
        a /= 2
    g = 1.0 / a
    return a, g


def _nv_fast_ok(mode: str, order: str, scale_el: ElementSpec) -> str:
    """The per-program condition of the NVFP4 inline decode: every block scale s * a (s / g)
    is below 4 in magnitude (`_nv_fast_limits`), so scale * 2^126 is finite and exact. False
    for a NaN / Inf global scale (the plain decode runs then)."""
    lo_a, hi_g = _nv_fast_limits(scale_el)
    a = _alpha_load(mode)
    return f"tl.abs({a}) >= {_f(hi_g)}" if order == "s/g" else f"tl.abs({a}) <= {_f(lo_a)}"


def _w_tile_helper(spec: KernelSpec, name: str, alpha_mode: str) -> str:
    """Three functions per weight operand: `{name}_ld` loads a [BN, BK] tile's raw packed
    bytes and scale bytes (nothing computed on them, so the loads can be issued one K step
    ahead and overlap the current step's decode and MMA: the kernels' PREFETCH), `{name}_dec`
    dequantizes them in registers, and `{name}` does both (no prefetch)."""
    fmt: BlockFormat = FORMATS[spec.op.weight_fmt]
    bs = fmt.block_size
    base = "w_ptr + e.to(tl.int64) * stride_we + rows[:, None] * stride_wn"
    m = "rmask[:, None] & kok"
    if fmt.pack_bits == 4:
        hi = "_decode_w_hi(byt)" if is_e2m1(fmt.element) else "_decode_w(byt >> 4)"
        lo = "_decode_w(byt)" if is_e2m1(fmt.element) else "_decode_w(byt & 15)"
        load = f"""kb = k0 // 2 + tl.arange(0, BK // 2)
byt = tl.load({base} + kb[None, :], mask={m} & _kmask(kb, K // 2, EVEN_K)[None, :], other=0)"""
        dec = f"""byt = byt.to(tl.int32)
v = tl.interleave({lo}, {hi})  # even k in the low nibble"""
    elif fmt.pack_bits == 8 or spec.op.fp6_layout == "unpacked":
        load = f"""kk = k0 + tl.arange(0, BK)
byt = tl.load({base} + kk[None, :], mask={m} & _kmask(kk, K, EVEN_K)[None, :], other=0)"""
        dec = "byt = byt.to(tl.int32)\n" + ("v = _decode_w(byt)" if fmt.pack_bits == 8 else "v = _decode_w(byt & 63)")
    else:  # 6-bit, Quark layout: W = b0 | b1<<8 | b2<<16 holds codes j = 0..3 at bits 6j
        load = f"""kk = k0 + tl.arange(0, BK)
m = {m} & _kmask(kk, K, EVEN_K)[None, :]
p = {base} + ((kk // 4) * 3)[None, :]
byt = (tl.load(p, mask=m, other=0).to(tl.int32) | (tl.load(p + 1, mask=m, other=0).to(tl.int32) << 8)
       | (tl.load(p + 2, mask=m, other=0).to(tl.int32) << 16))"""
        dec = "v = _decode_w((byt >> ((tl.arange(0, BK) % 4) * 6)[None, :]) & 63)  # k0 is a multiple of 4"
    sload = f"""ks = k0 // {bs} + tl.arange(0, BK // {bs})
sc = tl.load(s_ptr + e.to(tl.int64) * stride_se + rows[:, None] * stride_sn + ks[None, :],
             mask={m} & _kmask(ks, K // {bs}, EVEN_K)[None, :], other=0)"""
    op = spec.op
    if fmt.is_mx:
        sdec = "_e8m0_decode(sc)" if op.w_e8m0_byte255 == "nan" else "_e8m0_decode_w(sc)"
        if op.w_e8m0_byte0 == "zero":  # exponent-bit readers, (u << 23).view(float32): byte 0 is 0.0
            sdec = f"tl.where(sc == 0, 0.0, {sdec})"
        scale = f"s = {sdec}"
        post = ""
        if op.w_e8m0_byte255 == "ldexp":  # (v * 2^127) * 2 under byte 255: exact until it overflows
            scale += "\ns2 = tl.where(sc == 255, 2.0, 1.0)"
    else:
        scale = "s = _decode_e4m3(sc)\n" + _alpha_expr(alpha_mode, op.w_scale_order)
        post = _alpha_post(alpha_mode, op.w_scale_order)
    twice = " * s2[:, :, None]" if fmt.is_mx and op.w_e8m0_byte255 == "ldexp" else ""
    pad = " " * (len(name) + 8)
    slow_dec = (f"{dec}\nsc = sc.to(tl.int32)\n{scale.strip()}\n"
                f"v = tl.reshape(tl.reshape(v, (BN, BK // {bs}, {bs})) * s[:, :, None]{twice}, (BN, BK))"
                f"{post.replace(chr(10) + '    ', chr(10))}\n"
                "w = _wq(v)")
    kind = fast_decode_kind(spec, alpha_mode)
    if kind:
        # FASTDEC: the words as int16 (4 codes each) for the inline-PTX decode
        fast_ld = f"""kq = k0 // 4 + tl.arange(0, BK // 4)
byt = tl.load(({base}).to(tl.pointer_type(tl.int16)) + kq[None, :],
              mask={m} & _kmask(kq, K // 4, EVEN_K)[None, :], other=0)"""
        load = f"if FASTDEC:\n{_ind(fast_ld)}\nelse:\n{_ind(load)}"
    if kind == "mx":  # scales exact in bf16, products exact
        dec_body = (f"if FASTDEC:\n    v = _e2m1_i16_bf16(byt, BN, BK)\n    s = _e8m0_decode(sc.to(tl.int32)).to(tl.bfloat16)\n"
                    f"    w = tl.reshape(tl.reshape(v, (BN, BK // {bs}, {bs})) * s[:, :, None], (BN, BK))\n"
                    f"else:\n{_ind(slow_dec)}")
    elif kind == "nv":
        # one scale * 2^126 per word; where _nv_fast_ok fails (a large or non-finite global
        # scale) the words are split back into bytes for the plain decode
        fast = (f"s = _scale_by_bits(sc.to(tl.int32))\n{_alpha_expr(alpha_mode, op.w_scale_order)}\n"
                f"if {_nv_fast_ok(alpha_mode, op.w_scale_order, fmt.scale.element)}:\n"
                f"    sp = s * {_f(2.0 ** 126)}  # exact: |s| < 4 here\n"
                f"    sp = tl.reshape(tl.broadcast_to(sp[:, :, None], (BN, BK // {bs}, {bs // 4})), (BN, BK // 4))\n"
                f"    w = _e2m1_i16_nv(byt, sp, BN, BK)\n"
                f"else:\n    b32 = byt.to(tl.int32)\n"
                f"    w = {name}_plain(tl.interleave(b32 & 255, (b32 >> 8) & 255), sc, alpha_ptr, e, rows, rmask, NW, BN, BK)")
        dec_body = f"if FASTDEC:\n{_ind(fast)}\nelse:\n    w = {name}_plain(byt, sc, alpha_ptr, e, rows, rmask, NW, BN, BK)"
        # a function of its own: a runtime branch may not rebind byt / sc to other types
        plain = (f"@triton.jit\ndef {name}_plain(byt, sc, alpha_ptr, e, rows, rmask, NW, BN: tl.constexpr, BK: tl.constexpr):\n"
                 f"    # the plain decode of the tile's bytes\n{_ind(slow_dec)}\n    return w\n\n\n")
    else:
        dec_body = slow_dec
    return (plain if kind == "nv" else "") + f"""@triton.jit
def {name}_ld(w_ptr, s_ptr, e, rows, rmask, k0, K, kok, stride_we, stride_wn, stride_se, stride_sn,
{pad}BN: tl.constexpr, BK: tl.constexpr, EVEN_K: tl.constexpr, FASTDEC: tl.constexpr):
    # the raw packed bytes and scale bytes of a [BN, BK] {fmt.name} weight tile (none where kok is false)
{_ind(load)}
{_ind(sload)}
    return byt, sc


@triton.jit
def {name}_dec(byt, sc, alpha_ptr, e, rows, rmask, NW, BN: tl.constexpr, BK: tl.constexpr, FASTDEC: tl.constexpr):
    # dequantize the tile {name}_ld loaded, in registers: {spec.dtype}(value * scale)
{_ind(dec_body)}
    return w


@triton.jit
def {name}(w_ptr, s_ptr, alpha_ptr, e, rows, rmask, k0, K, NW, stride_we, stride_wn, stride_se, stride_sn,
{" " * (len(name) + 5)}BN: tl.constexpr, BK: tl.constexpr, EVEN_K: tl.constexpr, FASTDEC: tl.constexpr):
    # dequantize a [BN, BK] {fmt.name} weight tile in registers: {spec.dtype}(value * scale)
    byt, sc = {name}_ld(w_ptr, s_ptr, e, rows, rmask, k0, K, True, stride_we, stride_wn, stride_se, stride_sn,
{" " * (len(name) + 20)}BN, BK, EVEN_K, FASTDEC)
    return {name}_dec(byt, sc, alpha_ptr, e, rows, rmask, NW, BN, BK, FASTDEC)
"""


# EVEN_K (K a multiple of BK, the usual case): no mask along K. A mask like kb < K // 2
# hides from Triton's alignment analysis that whole 16-byte groups are in bounds, which
# turns the packed-weight and scale loads into byte loads; the row mask alone keeps them wide.
KMASK = """@triton.jit
def _kmask(kk, K, EVEN_K: tl.constexpr):
    if EVEN_K:
        return tl.full(kk.shape, 1, tl.int1)
    else:
        return kk < K
"""


# --- kernels -------------------------------------------------------------------------------


def _load_a_block() -> str:
    # `araw` (the stored dtype) feeds the dot directly when nothing transforms the rows in
    # the loop (prequantized rows, weight-only schemes): no fp32 round trip between the load
    # and the dot, so the load can be pipelined straight into shared memory
    return """kk = k0 + tl.arange(0, BK)
araw = tl.load(a_ptr + arow[:, None] * stride_a + kk[None, :], mask=rmask[:, None] & _kmask(kk, K, EVEN_K)[None, :],
               other=0.0)
a = araw.to(tl.float32)"""


def _row_index() -> str:
    return """offs = pid_m * BM + tl.arange(0, BM)
ids = tl.load(ids_ptr + offs)
rmask = ids < R
if A_INDEX == 0:
    arow = ids // TOPK
elif A_INDEX == 1:
    arow = ids
else:
    arow = offs
arow = tl.where(rmask, arow, 0)"""


def _a_scale_prologue(kind: str, static: bool, ptr: str, var: str) -> str:
    """Load the activation global/static scale (block NVFP4, fp8 static) or the fp8 amax."""
    if kind == "block":
        return f"{var} = tl.load({ptr})"
    if kind == "fp8_tensor":
        return f"{var} = tl.load({ptr})" if static else f"{var} = _fp8_scale(tl.load({ptr}))"
    return f"{var} = 0.0"
