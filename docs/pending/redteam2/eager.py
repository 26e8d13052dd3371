import sys, torch
import os; sys.path.insert(0, os.path.dirname(os.path.abspath(__file__))); sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", ".."))
from layers import LAYERS
from tests.corpus.oracle import act_reference, weight_reference, linear_reference, moe_reference, assert_within_accumulation
from tests.corpus.probes import same_bits

for name, make in LAYERS.items():
    if len(sys.argv) > 1 and name not in sys.argv[1:]:
        continue
    for dtype in (torch.bfloat16,):
        m, (x,) = make(1, dtype)
        v = m.variant
        view = m.emu_view()
        msgs = []
        with torch.no_grad():
            dq = m.dequantized_weights(dtype)
            for k, t in dq.items():
                ref = weight_reference(view[k], v.weight, dtype)
                msgs.append(f"w[{k}] bits={bool(same_bits(t, ref).all())}")
            if m.act_qdq is not None:
                for seed in range(3):
                    g = torch.Generator().manual_seed(seed)
                    xr = (torch.randn(8, H if (H := x.shape[-1]) else 0, generator=g) * torch.exp2(torch.randint(-20, 20, (8, 1), generator=g).float()))
                    xr[0, 3] = float("inf"); xr[1, :32] = 0.0; xr[2, 5] = -0.0; xr[3, 7] = float("nan")
                    xr = xr.to(dtype)
                    ok = same_bits(m.act_qdq(xr), act_reference(xr, v, view.get("a1_global"))).all()
                    msgs.append(f"act{seed}={bool(ok)}")
            out = m(x)
            ref = (moe_reference if "moe" in name else linear_reference)(m, x, v)
            try:
                assert_within_accumulation(out, ref, name); msgs.append("layer~oracle OK")
            except AssertionError as e:
                msgs.append(f"layer~oracle FAIL {e}")
            msgs.append(f"layer==oracle bits={torch.equal(out, ref)}")
        print(name, dtype, " ".join(msgs), flush=True)
