"""The inline-PTX weight decodes (`render_helpers.E2M1_FAST`, `E2M1_NV_FAST`) executed on the
CPU: a small interpreter runs the *rendered* asm text, instruction by instruction, on numpy
uint32 registers, and the results are compared bit for bit with the eager reference
dequantization over every packed byte value at every byte position of a word, under every
scale byte and the global-scale edge cases the fast path admits. Triton's interpreter cannot
run inline asm, so without this the PTX is only checked on a GPU (benchmarks/gpu_fastdec_check.py).
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from emu_inductor.formats import FORMATS
from emu_inductor.kernels import render_helpers as rh
from emu_inductor.reference.qdq import dequantize_weight


def _bf16_rne(f32: np.ndarray) -> np.ndarray:
    """fp32 -> bf16 bits, round to nearest even (NaN -> a quiet NaN)."""
    b = f32.astype(np.float32).view(np.uint32).astype(np.uint64)
    r = ((b + 0x7FFF + ((b >> 16) & 1)) >> 16).astype(np.uint32)
    return np.where(np.isnan(f32), np.uint32(0x7FC0), r & 0xFFFF).astype(np.uint32)


def _lanes_f32(x: np.ndarray):
    """The two bf16 lanes of a 32-bit register as fp32 (low, high)."""
    lo = ((x & 0xFFFF) << 16).astype(np.uint32).view(np.float32)
    hi = (x & 0xFFFF0000).astype(np.uint32).view(np.float32)
    return lo, hi


def _prmt(a, b, sel):
    src = [(a >> (8 * i)) & 0xFF for i in range(4)] + [(b >> (8 * i)) & 0xFF for i in range(4)]
    out = np.zeros_like(a)
    for i in range(4):
        out |= (src[(sel >> (4 * i)) & 7] << (8 * i)).astype(np.uint32)
    return out


def run_asm(asm: str, inputs: dict[int, np.ndarray]) -> dict[int, np.ndarray]:
    """Execute the asm body on uint32 arrays; `inputs` maps $n to its register values."""
    regs = {f"${n}": v.astype(np.uint32) for n, v in inputs.items()}

    def val(tok):
        tok = tok.strip()
        if tok in regs:
            return regs[tok]
        return np.uint32(int(tok, 0))

    body = asm.strip().strip("{}")
    for ins in [i.strip() for i in body.split(";") if i.strip()]:
        op, _, rest = ins.partition(" ")
        args = [a.strip() for a in rest.split(",")]
        if op == ".reg":
            continue
        d, src = args[0], [val(a) for a in args[1:]]
        if op == "mov.b32":
            r = src[0] + np.zeros_like(next(iter(regs.values())))
        elif op == "shl.b32":
            r = (src[0].astype(np.uint64) << np.uint64(src[1])).astype(np.uint32)
        elif op == "shr.b32":
            r = src[0] >> src[1]
        elif op == "and.b32":
            r = src[0] & src[1]
        elif op == "or.b32":
            r = src[0] | src[1]
        elif op == "mul.lo.u32":
            r = (src[0].astype(np.uint64) * np.uint64(src[1]) & 0xFFFFFFFF).astype(np.uint32)
        elif op == "mul.rn.f32":  # IEEE fp32 multiply, subnormals kept (no .ftz)
            with np.errstate(all="ignore"):
                r = (src[0].view(np.float32) * src[1].view(np.float32)).view(np.uint32)
        elif op == "cvt.rn.bf16x2.f32":  # d.hi = a, d.lo = b
            r = (_bf16_rne(src[0].view(np.float32)) << 16) | _bf16_rne(src[1].view(np.float32))
        elif op == "prmt.b32":
            r = _prmt(src[0], src[1], int(args[3], 0))
        elif op == "fma.rn.bf16x2":  # exact in fp64 for these operands, then one rounding
            (a0, a1), (b0, b1), (c0, c1) = _lanes_f32(src[0]), _lanes_f32(src[1]), _lanes_f32(src[2])
            with np.errstate(all="ignore"):
                lo = (a0.astype(np.float64) * b0 + c0).astype(np.float32)
                hi = (a1.astype(np.float64) * b1 + c1).astype(np.float32)
            # a double-rounding fp64 -> fp32 -> bf16 is exact here: the products are bf16 values
            r = (_bf16_rne(hi) << 16) | _bf16_rne(lo)
        else:  # pragma: no cover - a new instruction needs its emulation here
            raise NotImplementedError(op)
        regs[d] = np.asarray(r, dtype=np.uint32)
    return regs


def _asm_of(helper_src: str) -> str:
    return re.search(r'asm="""(.*?)"""', helper_src, re.S).group(1)


def _words():
    """Every byte value at every byte position: word b * 0x01010101 for b in 0..255, and the
    same bytes rotated through the positions with other bytes around them."""
    b = np.arange(256, dtype=np.uint32)
    same = b * np.uint32(0x01010101)
    mixed = b | (((b * 37 + 11) & 0xFF) << 8) | (((b * 101 + 7) & 0xFF) << 16) | (((b * 13 + 200) & 0xFF) << 24)
    rot = [((mixed << (8 * r)) | (mixed >> (32 - 8 * r))) & 0xFFFFFFFF if r else mixed for r in range(4)]
    return np.concatenate([same] + rot).astype(np.uint32)


def _decoded_k_order(outs: dict, n_words: int) -> np.ndarray:
    """The asm's outputs $0..$3 (codes 2j, 2j + 1 of each word) as bf16 bits [words, 8] in k order."""
    k = np.zeros((n_words, 8), dtype=np.uint32)
    for j in range(4):
        k[:, 2 * j] = outs[f"${j}"] & 0xFFFF
        k[:, 2 * j + 1] = outs[f"${j}"] >> 16
    return k


def _reference_bits(words: np.ndarray, scale_bytes: np.ndarray, fmt, alpha=None, order="s*a") -> np.ndarray:
    w = torch.from_numpy(words.view(np.uint8).reshape(-1, 4).copy())  # 8 codes per row
    s = torch.from_numpy(scale_bytes.astype(np.uint8).reshape(-1, 1).copy())
    if fmt.is_mx:
        w16 = torch.cat([w, w, w, w], dim=1)  # one 32-element block: the word, four times
        s = s.view(torch.uint8)
        ref = dequantize_weight(w16, s, fmt, dtype=torch.bfloat16)[:, :8]
    else:
        w8 = torch.cat([w, w], dim=1)  # one 16-element block
        s = s.view(torch.float8_e4m3fn)
        a = None if alpha is None else torch.full((w8.shape[0],), alpha, dtype=torch.float32)
        ref = dequantize_weight(w8.unsqueeze(1), s.unsqueeze(1), fmt, alpha=a, dtype=torch.bfloat16,
                                scale_order=order).squeeze(1)[:, :8]
    return ref.view(torch.int16).numpy().astype(np.uint32) & 0xFFFF


def _same(got: np.ndarray, ref: np.ndarray) -> np.ndarray:
    nan = lambda b: ((b & 0x7F80) == 0x7F80) & ((b & 0x7F) != 0)  # noqa: E731
    return (got == ref) | (nan(got) & nan(ref))


# global scales the NVFP4 fast path runs under (_nv_fast_ok): |a| <= 2^-7 (s * a), |g| >= 128 (s / g)
_NV_ALPHAS = [2.0 ** -7, -(2.0 ** -7), 1.0 / (448 * 6), 3.1e-3, 2.0 ** -30, 2.0 ** -118, 2.0 ** -140, 0.0]
_NV_GS = [128.0, -128.0, 448 * 6.0, 1e6, 2.0 ** 100]


@pytest.mark.parametrize("order,globals_", [("s*a", _NV_ALPHAS), ("s/g", _NV_GS)])
def test_nv_fast_decode_ptx_bit_exact(order, globals_):
    fmt = FORMATS["nvfp4"]
    asm = _asm_of(rh.E2M1_NV_FAST)
    words = _words()
    sbytes = np.arange(256, dtype=np.uint32)
    W = np.repeat(words, 256)
    SB = np.tile(sbytes, words.size)
    s32 = torch.from_numpy(SB.astype(np.uint8)).view(torch.float8_e4m3fn).float().numpy()
    for g in globals_:
        # the kernel's scale: fp32(s * a) (or div_rn(s, g)), times 2^126 (exact under _nv_fast_ok)
        with np.errstate(all="ignore"):
            sc = (s32 * np.float32(g)) if order == "s*a" else (s32 / np.float32(g))
            sp = (sc.astype(np.float32) * np.float32(2.0 ** 126)).astype(np.float32)
        assert np.all(np.isfinite(sp) | np.isnan(s32)), "the fast-path condition must keep scale * 2^126 finite"
        outs = run_asm(asm, {4: W, 5: sp.view(np.uint32), 6: sp.view(np.uint32)})
        got = _decoded_k_order(outs, W.size)
        ref = _reference_bits(W, SB, fmt, alpha=g, order=order)
        bad = ~_same(got, ref)
        assert not bad.any(), (f"global {g}: {int(bad.sum())} mismatches, first word {hex(int(W[bad.any(1)][0]))} "
                               f"scale byte {int(SB[bad.any(1)][0])}")


def test_nv_fast_ok_condition_text():
    # the runtime guard admits exactly the global scales above (and rejects NaN / Inf / large)
    e4m3 = FORMATS["nvfp4"].scale.element
    assert rh._nv_fast_ok("expert", "s*a", e4m3) == "tl.abs(tl.load(alpha_ptr + e)) <= 0.0078125"
    assert rh._nv_fast_ok("scalar", "s/g", e4m3) == "tl.abs(tl.load(alpha_ptr)) >= 128.0"
    assert 448 * 0.0078125 * 2.0 ** 126 < np.finfo(np.float32).max
    assert 448 / 128.0 * 2.0 ** 126 < np.finfo(np.float32).max


def test_mx_fast_decode_ptx_bit_exact():
    fmt = FORMATS["mxfp4"]
    asm = _asm_of(rh.E2M1_FAST)
    words = _words()
    outs = run_asm(asm, {4: words})
    got = _decoded_k_order(outs, words.size)  # values before the E8M0 scale (a separate exact multiply)
    ref = _reference_bits(words, np.full(words.size, 127, dtype=np.uint32), fmt)  # scale 2^0
    assert _same(got, ref).all()


@pytest.mark.parametrize("alpha_mode,order,kind", [
    ("expert", "s*a", "nv"), ("scalar", "s/g", "nv"), ("gate_up", "s*a", ""), ("none", "s*a", ""),
    ("expert", "(v*s)*a", ""),
])
def test_fast_decode_kind(alpha_mode, order, kind):
    from emu_inductor.kernels.kernel_spec import KernelSpec
    from emu_inductor.spec import OpSpec
    import dataclasses
    op = dataclasses.replace(OpSpec.from_scheme("nvfp4_w4a4"), w_scale_order=order)
    assert rh.fast_decode_kind(KernelSpec(op=op, dtype="bf16", alpha1=alpha_mode, alpha2=alpha_mode), alpha_mode) == kind
    assert rh.fast_decode_kind(KernelSpec(op=op, dtype="bf16", alpha1=alpha_mode, interpret=True), alpha_mode) == ""
    mx = KernelSpec(op=OpSpec.from_scheme("w_mxfp4_a_mxfp4"), dtype="bf16")
    assert rh.fast_decode_kind(mx, "none") == "mx"


def test_scale_by_bits_is_the_format_decode(tmp_path):
    """The inline NVFP4 path's block-scale decode (`scale_by_bits`, rendered from the format's
    ElementSpec) run under Triton's interpreter: every E4M3 byte equals torch's float8_e4m3fn
    value (NaN codes NaN, -0 kept)."""
    import importlib.util
    import os

    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("runs the Triton function under the interpreter")
    src = ("import triton\nimport triton.language as tl\n\n\n" + rh.scale_by_bits(FORMATS["nvfp4"].scale.element)
           + "\n\n@triton.jit\ndef k(u_ptr, o_ptr):\n    r = tl.arange(0, 256)\n"
           "    tl.store(o_ptr + r, _scale_by_bits(tl.load(u_ptr + r)))\n")
    path = tmp_path / "scale_by_bits_mod.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("scale_by_bits_mod", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    u = torch.arange(256, dtype=torch.int32)
    out = torch.empty(256, dtype=torch.float32)
    mod.k[(1,)](u, out)
    want = u.to(torch.uint8).view(torch.float8_e4m3fn).float()
    same = (out.view(torch.int32) == want.view(torch.int32)) | (out.isnan() & want.isnan())
    assert same.all(), u[~same].tolist()
