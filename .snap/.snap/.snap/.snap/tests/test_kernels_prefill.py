"""The prefill kernel options (issue 10), under Triton's interpreter: prefetching the next
K step's packed weights (prefetch=1, every weight layout: 4-bit pairs, 8-bit, 6-bit in
Quark's 3-byte groups), with and without the K masks (EVEN_K: K a multiple of BK or not),
with split-K and swapped operands, compute the SAME function as the plain one-pass kernel:
A1, C2 and A2 rows bit-identical (the same products summed in the same order) and the
output bit-identical under the deterministic reduction. Fresh random inputs per case."""


import pytest
import torch

from emu_inductor.kernels.tiles import TileConfig
from emu_inductor.ops.triton_impl import moe_triton
from emu_inductor.reference import moe_emulated
from emu_inductor.spec import OpSpec
from helpers import random_moe_case

E, T = 4, 5


def _case(scheme, activation, H, I, name):
    return random_moe_case(scheme, activation, name, E=E, H=H, I=I, T=T)[:4]


def _run(qe, scheme, activation, x, tw, ids, cfg):
    spec = OpSpec.from_scheme(scheme, activation=activation)
    return moe_triton(x, qe.w13, qe.w13_scale, qe.w13_alpha, qe.w2, qe.w2_scale, qe.w2_alpha, tw, ids,
                      qe.a1_global_scale, qe.a2_global_scale, None, spec, config=cfg, debug=True,
                      reduction="deterministic")


# (scheme, activation, H, I, BK, split1, swap): H, I of 96 with BK 64 leave a partial last
# K tile (EVEN_K false: masked loads, and a prefetch past the end that must load nothing)
CASES = [("nvfp4_w4a4", "silu", 128, 64, 32, 1, 0), ("nvfp4_w4a4", "silu", 96, 96, 64, 1, 0),
         ("w_mxfp4_a_mxfp4", "swigluoai", 128, 64, 32, 2, 1), ("nvfp4_w4a16", "relu2_no_mul", 96, 96, 64, 2, 0),
         ("w_mxfp6_e3m2_a_mxfp6_e3m2", "gelu", 128, 64, 32, 1, 0),
         ("w_mxfp8_e4m3_a_mxfp8_e4m3", "silu", 96, 96, 64, 1, 1)]


@pytest.mark.parametrize("scheme,activation,H,I,BK,split1,swap", CASES,
                         ids=[f"{c[0]}-{c[1]}-H{c[2]}-BK{c[4]}-s{c[5]}-w{c[6]}" for c in CASES])
def test_prefetch_is_the_same_function(scheme, activation, H, I, BK, split1, swap):
    qe, x, tw, ids = _case(scheme, activation, H, I, f"{scheme}/{activation}/{H}/{BK}/{split1}/{swap}")
    base = _run(qe, scheme, activation, x, tw, ids, TileConfig(16, 32, BK, 4, 1, split1=split1, swap=swap))
    pre = _run(qe, scheme, activation, x, tw, ids, TileConfig(16, 32, BK, 4, 1, split1=split1, swap=swap,
                                                               prefetch=1))
    v = base["valid"]
    assert v.all()
    for key in ("a1", "c2", "a2"):
        if base[key] is not None:
            assert torch.equal(pre[key][v], base[key][v]), key
    assert torch.equal(pre["out"], base["out"])
    ref = moe_emulated(x, qe.w13, qe.w2, tw, ids, scheme=scheme, w13_scale=qe.w13_scale, w2_scale=qe.w2_scale,
                       w13_alpha=qe.w13_alpha, w2_alpha=qe.w2_alpha, a1_global_scale=qe.a1_global_scale,
                       a2_global_scale=qe.a2_global_scale, activation=activation)
    assert (pre["out"].float() - ref.float()).abs().max().item() <= 0.02 * max(1.0, ref.float().abs().max().item())
