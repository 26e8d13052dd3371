"""The eager MoE emulation: the numerics oracle for every fused kernel and pass.

Per (token t, slot k) with local expert e = expert_map[topk_ids[t, k]] (skipped if -1):
    A1  = QDQ_a1(x[t])                         (x[t] * w[t, k] first if router weight on input)
    C1  = dtype(fp32 sum_K A1 * W13[e])        GEMM1, fp32 accumulation, one rounding
    C2  = act(C1)                              eager roundings of the activation
    A2  = QDQ_a2(C2)
    C3  = dtype(fp32 sum_K A2 * W2[e])         GEMM2
          (optional per-expert biases, vLLM's HAS_BIAS: C1 = dtype(fp32 acc + fp32(b13[e])),
           C3 = dtype(fp32 acc + fp32(b2[e])); still one rounding per GEMM)
    out[t] = dtype(sum_k fp32(w[t, k]) * fp32(C3))   (no weight if applied on input)
Weights are dequantized to `dtype` first (exactly as vLLM's emulation does); the GEMMs are
written in one of three styles users write, all computing the same rows:
    "grouped_mm"  sort rows by expert, torch._grouped_mm with int32 offsets (bf16 only)
    "bmm"         gather each row's expert weight and bmm
    "loop"        a Python loop over experts with masks (Dynamo unrolls it; small E)
With biases, the grouped_mm style extends K (torch._grouped_mm has no fp32 output for
bf16 operands): activations get a ones column and BIAS_PAD - 1 zero columns, weights
the bias column and zero columns (`grouped_bias_operands`), so the fp32 accumulator
holds sum_K a*w + 1*b before the single cast; 16-byte strides are kept.
Differences to vLLM, on purpose: the router weight multiplies the rounded GEMM2 output
and slots are summed in fp32 (vLLM multiplies the fp32 accumulator and, for top-k 2..4,
sums in bf16); both are within one bf16 rounding.
"""

from __future__ import annotations

from typing import Optional

import torch

from .activations import apply_activation, check_activation, is_gated
from .qdq import act_fake_quantize, dequantize_weight
from ..spec.schemes import Scheme, get_scheme

__all__ = ["moe_emulated", "dequantize_experts", "GEMM_STYLES", "check_moe_args", "check_bias", "expert_gemm",
           "grouped_bias_operands", "BIAS_PAD", "check_act_scale", "check_gemm_style"]

GEMM_STYLES = ("grouped_mm", "bmm", "loop")
_ACT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _fail(arg: str, got, expected: str):
    raise ValueError(f"{arg}: expected {expected}, got {got}")


def _check_weight(name, w, scale, fmt, E, N, K, alpha, alpha_name):
    if not isinstance(w, torch.Tensor) or w.dtype != torch.uint8:
        _fail(name, getattr(w, "dtype", type(w).__name__), "packed uint8 weights")
    if K % fmt.block_size:
        _fail(name, f"reduction size K={K}", f"K divisible by the {fmt.name} block size {fmt.block_size}")
    if fmt.pack_bits == 4 and K % 2:
        _fail(name, f"odd K={K}", "an even K for 4-bit packing")
    exp_shape = (E, N, fmt.packed_size(K))
    if tuple(w.shape) != exp_shape:
        _fail(name, f"shape {tuple(w.shape)}", f"shape {exp_shape} for {fmt.name}")
    sname = name + "_scale"
    if not isinstance(scale, torch.Tensor) or scale.dtype != fmt.scale.storage_dtype:
        _fail(sname, getattr(scale, "dtype", type(scale).__name__), f"dtype {fmt.scale.storage_dtype} for {fmt.name}")
    exp_s = (E, N, K // fmt.block_size)
    if tuple(scale.shape) != exp_s:
        _fail(sname, f"shape {tuple(scale.shape)}", f"shape {exp_s}")
    if alpha is not None:
        if fmt.is_mx:
            _fail(alpha_name, "a tensor", f"None: {fmt.name} has no global scale")
        if alpha.dtype != torch.float32:
            _fail(alpha_name, alpha.dtype, "float32")
        if tuple(alpha.shape) not in ((E,), (E, 1), (E, 2), (E, N)) and alpha.numel() != 1:
            _fail(alpha_name, f"shape {tuple(alpha.shape)}", f"one value, [E]={E}, [E, 2] or [E, {N}]")
        if not torch.compiler.is_compiling() and alpha.device.type == "cpu":
            if not bool(torch.all(torch.isfinite(alpha) & (alpha > 0))):
                _fail(alpha_name, "non-finite or non-positive values", "finite positive global scales")


def check_bias(name: str, bias: Optional[torch.Tensor], like: torch.Tensor, shape: tuple) -> None:
    """An optional per-expert GEMM bias: a tensor of the activation dtype (`like`'s), of
    `shape`, on `like`'s device; ValueError naming `name` otherwise (metadata only, no sync).
    The one bias check: the reference, the mxemu ops and the kernel launchers call it."""
    if bias is None:
        return
    if not isinstance(bias, torch.Tensor):
        _fail(name, type(bias).__name__, f"a tensor of shape {list(shape)} or None")
    if bias.dtype != like.dtype:
        _fail(name, bias.dtype, f"dtype {like.dtype} (the activation dtype)")
    if tuple(bias.shape) != tuple(shape):
        _fail(name, f"shape {list(bias.shape)}", f"shape {list(shape)}")
    if bias.device != like.device:
        _fail(name, f"a tensor on {bias.device}", f"a tensor on {like.device} like the activations")


def check_act_scale(name: str, g, *, required: bool = False, why: str = "") -> None:
    """An activation scale argument (NVFP4 global scale, static fp8 scale): None (unless
    `required`) or one float32 value, finite and positive. TypeError for a Python number
    (the fused ops take tensors), ValueError naming `name` otherwise. The value check
    needs the data: only in eager and on the CPU (no device sync), like the formats'."""
    if g is None:
        if required:
            _fail(name, None, "a float32 tensor" + (f": {why}" if why else ""))
        return
    if not isinstance(g, torch.Tensor):
        raise TypeError(f"{name}: expected a float32 tensor (e.g. torch.tensor([{g!r}])), got {type(g).__name__}")
    if g.dtype != torch.float32 or g.numel() != 1:
        _fail(name, f"{g.dtype} with {g.numel()} elements", "one float32 value (quantize direction)")
    if not torch.compiler.is_compiling() and g.device.type == "cpu":
        if not bool(torch.isfinite(g).all() & (g > 0).all()):
            _fail(name, g.item(), "a finite positive scale")


def check_gemm_style(gemm_style: str, hidden_states) -> None:
    if gemm_style not in GEMM_STYLES:
        _fail("gemm_style", repr(gemm_style), f"one of {GEMM_STYLES}")
    if gemm_style == "grouped_mm" and getattr(hidden_states, "dtype", None) != torch.bfloat16:
        _fail("hidden_states", getattr(hidden_states, "dtype", type(hidden_states).__name__),
              "bfloat16 with gemm_style='grouped_mm' (torch._grouped_mm takes bf16 only); "
              "use gemm_style='bmm' or 'loop' for float16 / float32")


def check_moe_args(hidden_states, w13, w2, topk_weights, topk_ids, scheme: Scheme, *, w13_scale, w2_scale,
                   w13_alpha, w2_alpha, activation, apply_router_weight_on_input, expert_map,
                   a1_global_scale, a2_global_scale, w13_bias=None, w2_bias=None, gemm_style=None,
                   check_act_scales=True):
    """Validate shapes and dtypes; every error names the offending argument.
    gemm_style: checked against the activation dtype when given. check_act_scales=False
    skips a1/a2_global_scale (a module validating the batch it calibrates them from)."""
    if gemm_style is not None:
        check_gemm_style(gemm_style, hidden_states)
    check_activation(activation)
    for name, t in (("hidden_states", hidden_states), ("w13", w13), ("w2", w2), ("topk_weights", topk_weights),
                    ("topk_ids", topk_ids)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a tensor, got {type(t).__name__}")
    if hidden_states.dim() != 2:
        _fail("hidden_states", getattr(hidden_states, "shape", type(hidden_states).__name__), "a 2-d [T, H] tensor")
    if hidden_states.dtype not in _ACT_DTYPES:
        _fail("hidden_states", hidden_states.dtype, "bfloat16, float16 or float32")
    T, H = hidden_states.shape
    fmt = scheme.weight_fmt
    if w13.dim() != 3:
        _fail("w13", f"{w13.dim()}-d", "[E, N, K_packed]")
    if w2.dim() != 3:
        _fail("w2", f"{w2.dim()}-d", "[E, H, I_packed]")
    E = w13.shape[0]
    if w2.shape[0] != E:
        _fail("w2", f"{w2.shape[0]} experts", f"{E} experts, as in w13")
    # The weights agree on the hidden size (w13's K, w2's N) but the activations do not:
    # the activations are what is wrong.
    H_w = w2.shape[1]
    if H != H_w and fmt.logical_size(w13.shape[2]) == H_w:
        _fail("hidden_states", f"hidden size {H} (shape {tuple(hidden_states.shape)})",
              f"hidden size {H_w}, as in w13 {tuple(w13.shape)} and w2 {tuple(w2.shape)} ({fmt.name})")
    I = fmt.logical_size(w2.shape[2])
    N1 = 2 * I if is_gated(activation) else I
    _check_weight("w13", w13, w13_scale, fmt, E, N1, H, w13_alpha, "w13_alpha")
    _check_weight("w2", w2, w2_scale, fmt, E, H, I, w2_alpha, "w2_alpha")
    if topk_ids.dim() != 2 or topk_ids.shape[0] != T:
        _fail("topk_ids", f"shape {tuple(topk_ids.shape)}", f"[T={T}, top_k]")
    if topk_ids.dtype not in (torch.int32, torch.int64):
        _fail("topk_ids", topk_ids.dtype, "int32 or int64")
    if tuple(topk_weights.shape) != tuple(topk_ids.shape):
        _fail("topk_weights", f"shape {tuple(topk_weights.shape)}", f"shape {tuple(topk_ids.shape)} like topk_ids")
    if not topk_weights.is_floating_point():
        _fail("topk_weights", topk_weights.dtype, "a float tensor")
    if apply_router_weight_on_input and topk_ids.shape[1] != 1:
        _fail("apply_router_weight_on_input", f"top_k={topk_ids.shape[1]}", "top_k == 1")
    n_global = E
    if expert_map is not None:
        if expert_map.dim() != 1 or expert_map.dtype not in (torch.int32, torch.int64):
            _fail("expert_map", f"{expert_map.dtype} of shape {tuple(expert_map.shape)}", "a 1-d int tensor [E_global]")
        n_global = expert_map.shape[0]
    if not torch.compiler.is_compiling() and topk_ids.device.type == "cpu" and topk_ids.numel():
        lo, hi = int(topk_ids.min()), int(topk_ids.max())
        if lo < 0 or hi >= n_global:
            _fail("topk_ids", f"ids in [{lo}, {hi}]", f"ids in [0, {n_global - 1}]")
        if expert_map is not None and expert_map.numel():
            if int(expert_map.max()) >= E or int(expert_map.min()) < -1:
                _fail("expert_map", f"values in [{int(expert_map.min())}, {int(expert_map.max())}]", f"-1 or 0..{E - 1}")
    check_bias("w13_bias", w13_bias, hidden_states, (E, N1))
    check_bias("w2_bias", w2_bias, hidden_states, (E, H))
    act = scheme.act
    needs_gs = act is not None and act.kind == "block" and act.fmt.has_global_scale
    if act is not None and check_act_scales:
        for name, g in (("a1_global_scale", a1_global_scale), ("a2_global_scale", a2_global_scale)):
            check_act_scale(name, g, required=needs_gs,
                            why=f"{scheme.name} quantizes activations with a static global scale")
    return T, H, E, I


def _expand_alpha(alpha, E, N):
    """[E, 2] gate/up global scales -> one per output row [E, N]; others pass through."""
    if alpha is None or alpha.dim() != 2 or alpha.shape[1] != 2 or N == 2:
        return alpha
    return alpha.repeat_interleave(N // 2, dim=1)


def dequantize_experts(w, scale, fmt, alpha=None, dtype=torch.bfloat16, fp6_layout="quark", *,
                       e8m0_byte255="nan", scale_order="s*a", e8m0_byte0="pow2"):
    """All experts' weights in `dtype` ([E, N, K]); per gate/up alphas supported exactly."""
    return dequantize_weight(w, scale, fmt, alpha=_expand_alpha(alpha, w.shape[0], w.shape[1]),
                             dtype=dtype, fp6_layout=fp6_layout, e8m0_byte255=e8m0_byte255,
                             scale_order=scale_order, e8m0_byte0=e8m0_byte0)


def sort_by_expert(key: torch.Tensor, E: int):
    """(order, offs): a stable permutation putting rows in expert order, and the int32
    cumulative group ends torch._grouped_mm takes (rows with key == E sort last, outside
    every group). Device-side ops only: no host sync."""
    order = torch.argsort(key, stable=True)
    counts = torch.zeros(E + 1, dtype=torch.int32, device=key.device)
    counts = counts.index_add(0, key, torch.ones_like(key, dtype=torch.int32))
    return order, torch.cumsum(counts[:E], 0, dtype=torch.int32)


#: Columns the grouped_mm-style bias adds to K: one ones/bias column and BIAS_PAD - 1
#: zero columns (keeps K + BIAS_PAD a multiple of 8: 16-byte bf16 strides).
BIAS_PAD = 8


def grouped_bias_operands(a_rows: torch.Tensor, w: torch.Tensor, bias: torch.Tensor):
    """K-extended GEMM operands whose product is a_rows @ w.T + bias, accumulated in fp32
    before the one cast: [a | 1 | 0...] and [w | bias | 0...] (bias * 1.0 is exact)."""
    R = a_rows.shape[0]
    pad = BIAS_PAD - 1
    a_ext = torch.cat([a_rows, a_rows.new_ones(R, 1), a_rows.new_zeros(R, pad)], dim=1)
    w_ext = torch.cat([w, bias.unsqueeze(-1), w.new_zeros(w.shape[0], w.shape[1], pad)], dim=2)
    return a_ext, w_ext


def expert_gemm(a_rows: torch.Tensor, w: torch.Tensor, key: torch.Tensor, E: int, style: str,
                 bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Row r of the result is a_rows[r] @ w[key[r]].T (+ bias[key[r]], added to the fp32
    accumulator before the one rounding); rows with key == E give zeros."""
    valid = (key < E).unsqueeze(-1)
    dtype = a_rows.dtype
    if style == "grouped_mm":
        if bias is not None:
            a_rows, w = grouped_bias_operands(a_rows, w, bias)
        order, offs = sort_by_expert(key, E)
        y_sorted = torch._grouped_mm(a_rows[order], w.transpose(-2, -1), offs=offs)
        y = torch.empty_like(y_sorted)
        y[order] = y_sorted
    elif style == "bmm":
        if bias is not None:  # fp32 gather + bmm (products of the dtype's values are exact in fp32)
            kc = key.clamp(max=E - 1)
            y = torch.bmm(a_rows.float().unsqueeze(1), w.float()[kc].transpose(-2, -1)).squeeze(1)
            y = (y + bias.float()[kc]).to(dtype)
        else:
            wg = w[key.clamp(max=E - 1)]  # [R, N, K]
            y = torch.bmm(a_rows.unsqueeze(1), wg.transpose(-2, -1)).squeeze(1)
    else:  # loop
        y = a_rows.new_zeros(a_rows.shape[0], w.shape[1])
        for e in range(E):
            if bias is not None:
                ye = (a_rows.float() @ w[e].float().t() + bias[e].float()).to(dtype)
            else:
                ye = a_rows @ w[e].t()
            y = torch.where((key == e).unsqueeze(-1), ye, y)
    return torch.where(valid, y, torch.zeros_like(y))


def moe_emulated(
    hidden_states: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    *,
    scheme,
    w13_scale: torch.Tensor,
    w2_scale: torch.Tensor,
    w13_alpha: Optional[torch.Tensor] = None,
    w2_alpha: Optional[torch.Tensor] = None,
    a1_global_scale: Optional[torch.Tensor] = None,
    a2_global_scale: Optional[torch.Tensor] = None,
    activation: str = "silu",
    apply_router_weight_on_input: bool = False,
    expert_map: Optional[torch.Tensor] = None,
    gemm_style: str = "grouped_mm",
    fp6_layout: str = "quark",
    validate: bool = True,
    w13_bias: Optional[torch.Tensor] = None,
    w2_bias: Optional[torch.Tensor] = None,
    e8m0_byte255: str = "nan",
    scale_order: str = "s*a",
    e8m0_byte0: str = "pow2",
) -> torch.Tensor:
    """Emulated quantized MoE forward; see the module docstring for the exact numerics.

    Weights in vLLM's layout: w13 [E, 2I, H*bits/8] (gate rows then up rows; interleaved
    for swigluoai; [E, I, ...] for *_no_mul), w2 [E, H, I*bits/8], scales [E, N, K/block].
    NVFP4: w13_alpha / w2_alpha are dequantize-direction per-expert global scales ([E],
    or [E, 2] for separate gate/up); a1/a2_global_scale the per-layer activation global
    scales (quantize direction). `a_fp8` schemes take optional static a1/a2 scales.
    w13_bias [E, N1] / w2_bias [E, H] (activation dtype, optional): per-expert GEMM biases
    added to the fp32 accumulator before the GEMM's one rounding (vLLM's HAS_BIAS).
    e8m0_byte255 / scale_order: how both GEMMs' weights are read, as `dequantize_weight`
    takes them (MX scale byte 255 as NaN or +inf; NVFP4 s*a, s/g or (v*s)*a): the readers
    of ModelOpt, Quark, compressed-tensors and gpt-oss that the passes prove; e8m0_byte0
    "zero" reads MX scale byte 0 as 0.0 (exponent-bit readers) instead of 2^-127.
    """
    scheme = get_scheme(scheme)
    check_gemm_style(gemm_style, hidden_states)
    if validate:
        T, H, E, I = check_moe_args(
            hidden_states, w13, w2, topk_weights, topk_ids, scheme, w13_scale=w13_scale, w2_scale=w2_scale,
            w13_alpha=w13_alpha, w2_alpha=w2_alpha, activation=activation,
            apply_router_weight_on_input=apply_router_weight_on_input, expert_map=expert_map,
            a1_global_scale=a1_global_scale, a2_global_scale=a2_global_scale, w13_bias=w13_bias,
            w2_bias=w2_bias,
        )
    else:
        (T, H), E = hidden_states.shape, w13.shape[0]
    dtype = hidden_states.dtype
    fmt = scheme.weight_fmt
    top_k = topk_ids.shape[1]

    W13 = dequantize_experts(w13, w13_scale, fmt, w13_alpha, dtype, fp6_layout, e8m0_byte255=e8m0_byte255,
                             scale_order=scale_order, e8m0_byte0=e8m0_byte0)
    W2 = dequantize_experts(w2, w2_scale, fmt, w2_alpha, dtype, fp6_layout, e8m0_byte255=e8m0_byte255,
                            scale_order=scale_order, e8m0_byte0=e8m0_byte0)

    ids = topk_ids.reshape(-1).long()
    local = expert_map.long()[ids] if expert_map is not None else ids
    key = torch.where(local >= 0, local, torch.full_like(local, E))  # E marks "not on this rank"
    w_flat = topk_weights.reshape(-1)

    x = hidden_states
    x_rows = x.repeat_interleave(top_k, dim=0)  # row r = (token r // k, slot r % k)
    if apply_router_weight_on_input:
        x_rows = x_rows * w_flat.to(dtype).unsqueeze(-1)
    a1 = act_fake_quantize(x_rows, scheme.act, a1_global_scale)
    c1 = expert_gemm(a1, W13, key, E, gemm_style, w13_bias)
    c2 = apply_activation(c1, activation)
    a2 = act_fake_quantize(c2, scheme.act, a2_global_scale)
    c3 = expert_gemm(a2, W2, key, E, gemm_style, w2_bias)
    c3 = c3.reshape(T, top_k, H).to(torch.float32)
    if not apply_router_weight_on_input:
        c3 = c3 * topk_weights.to(torch.float32).unsqueeze(-1)
    return c3.sum(dim=1).to(dtype)
