"""Models whose MoE blocks quantize_model recognizes by structure, under
torch.compile(backend="mxemu"): OLMoE, PhiMoE, GraniteMoE, Jamba (tiny configs, random
weights, NVFP4 w4a4 experts, calibrated) and a transformers-4.x-style user model
(plain-Linear router with the routing recipe, ModuleList experts).

Every MoE layer must become one mxemu::moe (counters equal the layer count), with no
graph break, and the compiled logits must equal eager emulation bit for bit. Jamba's
Mamba layers run transformers' PyTorch path, which stock Inductor itself does not compile
bit-exactly (the unquantized model compiled with backend="inductor" differs from eager by
up to 4e-3 on these logits); so for Jamba the whole-model compile is held to 1e-2 and
the MoE blocks alone, compiled with the rest eager, to bit equality.
Pattern setup (~35 s) is paid once per process; each model then compiles in ~10-20 s.
"""

import pytest
import torch

pytest.importorskip("transformers")

from emu_inductor.models import quantize_model, quantized_modules  # noqa: E402
from helpers import model_backend as _backend  # noqa: E402
from structure_models import ARCHS, Stack, UserListMoE, hf_model, ids  # noqa: E402


def _compile_counts(fn):
    """Run `fn` under a fresh Dynamo / FX-graph cache; returns (result, counters copy)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    try:
        with torch.no_grad(), torch._inductor.utils.fresh_cache():  # a cache hit would skip the pass
            out = fn()
    finally:
        torch._dynamo.reset()
    return out, {k: dict(v) for k, v in counters.items()}


def _check_fused(c, n_moe):
    assert not c.get("graph_break"), c.get("graph_break")
    assert c["mxemu"].get("moe") == n_moe, c["mxemu"]
    assert c["inductor"].get("mxemu_moe") == n_moe, c["inductor"]


@pytest.mark.slow
@pytest.mark.parametrize("arch", list(ARCHS))
def test_structure_arch_compiles_to_one_moe_per_layer(arch):
    data = ids()
    m = quantize_model(hf_model(arch), "nvfp4_w4a4", calibration_data=data)
    n_moe = len(quantized_modules(m)["moe"])
    assert n_moe == 2
    with torch.no_grad():
        ref = m(data, use_cache=False).logits
    out, c = _compile_counts(lambda: torch.compile(m, backend=_backend())(data, use_cache=False).logits)
    _check_fused(c, n_moe)
    assert c["stats"]["unique_graphs"] == 1, c["stats"]
    if arch != "jamba":
        assert torch.equal(out, ref), (out.float() - ref.float()).abs().max()
        return
    torch.testing.assert_close(out.float(), ref.float(), atol=1e-2, rtol=1e-2)
    # the MoE blocks compiled on their own (both layers share one graph: the weights are
    # its inputs), Mamba and attention eager: bit for bit
    for name in quantized_modules(m)["moe"]:
        m.get_submodule(name).compile(backend=_backend())
    out, c = _compile_counts(lambda: m(data, use_cache=False).logits)
    _check_fused(c, 1)
    assert torch.equal(out, ref), (out.float() - ref.float()).abs().max()


@pytest.mark.slow
def test_user_plain_linear_router_model_compiles():
    """Routing recipe (softmax fp32 -> top-k -> renorm -> bf16) + stacked w1/w3/w2 experts."""
    model = Stack(lambda: UserListMoE(norm_topk_prob=True)).to(torch.bfloat16).eval()
    data = ids(1)
    quantize_model(model, "nvfp4_w4a4", calibration_data=data)
    assert all(model.get_submodule(n).routing is not None for n in quantized_modules(model)["moe"])
    with torch.no_grad():
        ref = model(data)
    out, c = _compile_counts(lambda: torch.compile(model, backend=_backend())(data))
    _check_fused(c, 2)
    assert torch.equal(out, ref), (out.float() - ref.float()).abs().max()
