"""Weight decodes written as products with a value table over a one-hot axis:
`one_hot(code, 16).float() @ LUT[16, 1]` and `(one_hot(code, 16) * LUT).sum(-1)`. The
contracted / reduced dim comes from `code.unsqueeze(-1) == arange(16)`: every output
element still reads one code, so the structural half of the proof stands
(`structure._contraction_ok`); the probes decide the values (the product decodes code
0x8 as +0: -0 * 1 plus +0 terms). A product over a dim that holds data (16 codes summed)
is refused. Compiled, F.one_hot's bounds assertions read the decode's codes; they are
checks, not a second use, and the layer fuses."""

import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters
from torch._inductor.utils import run_and_get_code

from emu_inductor import _compat
from emu_inductor.formats import quantize
from emu_inductor.recognize import Rejection, WeightVerdict, gemm_nodes, recognize_weight

from tests.corpus.oracle import assert_within_accumulation
from tests.test_recognize_weight import trace

E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]


def _codes(p):
    return torch.stack([p & 15, p >> 4], -1).flatten(-2).long()


def _scaled(v, s):
    return (v.unflatten(-1, (-1, 32)) * torch.exp2(s.float() - 127.0)[..., None]).flatten(-2).to(torch.bfloat16)


def onehot_mm(p, s):
    lut = torch.tensor(E2M1, device=p.device).unsqueeze(1)
    return _scaled((F.one_hot(_codes(p), 16).float() @ lut).squeeze(-1), s)


def onehot_sum(p, s):
    lut = torch.tensor(E2M1, device=p.device)
    return _scaled((F.one_hot(_codes(p), 16).float() * lut).sum(-1), s)


def data_mm(p, s):
    """Near miss: a product over 16 codes (a data dim), not a look-up."""
    c = _codes(p).float()  # [N, K]
    mix = torch.eye(16)  # the identity mix: equal values on every probe would not prove it
    return _scaled((c.reshape(-1, 16) @ mix).reshape(c.shape), s)


def _bytes(seed, *shape, lo=0, hi=256):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(lo, hi, shape, generator=g).to(torch.uint8)


def _recognise(fn, N=40, K=64):
    x = torch.randn(4, K, dtype=torch.bfloat16)
    c, s = _bytes(1, N, K // 2), _bytes(2, N, K // 32, lo=110, hi=140)
    gm = trace(lambda x, c, s: x @ fn(c, s).t(), x, c, s)
    gemms = [g for g in gemm_nodes(gm.graph) if g.args[0].name.startswith("arg0") or g.args[0].op == "placeholder"]
    (gemm,) = gemms
    return recognize_weight(gemm, use_cache=False), c, s


def _same_as_user(v, fn, c, s):
    for seed in (31, 32):
        c2, s2 = _bytes(seed, *c.shape), _bytes(seed + 1, *s.shape, lo=100, hi=150)
        assert torch.equal(fn(c2, s2).view(torch.int16), v.reference(c2, s2).mT.view(torch.int16))


def test_onehot_matmul_decode_recognised():
    v, c, s = _recognise(onehot_mm)
    assert isinstance(v, WeightVerdict), v.reason
    assert v.variant.fmt == "mxfp4" and v.kernel_supported
    assert "code 0x8 = +0" in v.variant.name, v.variant.name  # -0 * 1 + (+0) terms = +0
    _same_as_user(v, onehot_mm, c, s)


def test_onehot_sum_decode_recognised():
    v, c, s = _recognise(onehot_sum)
    assert isinstance(v, WeightVerdict), v.reason
    _same_as_user(v, onehot_sum, c, s)


def test_product_over_data_is_refused():
    v, _, _ = _recognise(data_mm)
    assert isinstance(v, Rejection), v
    assert "matrix product of data" in v.reason, v.reason


class OneHotLinear(torch.nn.Module):
    def __init__(self, N=48, K=64):
        super().__init__()
        torch.manual_seed(5)
        q = quantize(torch.randn(N, K), "mxfp4")
        self.register_buffer("qw", q.qdata)
        self.register_buffer("qs", q.scale.view(torch.uint8))
        self.register_buffer("lut", torch.tensor(E2M1).unsqueeze(1))

    def forward(self, x):
        v = (F.one_hot(_codes(self.qw), 16).float() @ self.lut).squeeze(-1)
        return F.linear(x, _scaled(v, self.qs))


def test_onehot_linear_fuses_past_its_bounds_asserts():
    m = OneHotLinear()
    x = torch.randn(2, 3, 64, dtype=torch.bfloat16)
    counters.clear()
    torch._dynamo.reset()
    with _compat.inductor_caches_disabled(), torch.no_grad():
        out, code = run_and_get_code(torch.compile(m, backend="mxemu"), x)
        ref = m(x)
    code = "\n".join(code)
    assert counters["mxemu"]["semantic"] == 1, dict(counters["mxemu"])
    assert code.count("torch.ops.mxemu.linear.default(") == 1, code[-3000:]
    assert_within_accumulation(out, ref, "one-hot linear")
