"""GPU check of the one-launch value checks (kernels.checks): a bad argument must fail
the stream with a device assert naming it, a good call must not; each case runs in a
subprocess (a device assert poisons the CUDA context). Also: the eager MoE layer (routing,
validation, kernels) makes no device-to-host sync (torch.cuda.set_sync_debug_mode("error")
once each token bucket has been autotuned: autotuning a new bucket times kernels, once).

    PYTHONPATH=. python3 benchmarks/gpu_value_checks.py
"""

import subprocess
import sys

CASE = r"""
import torch
from emu_inductor.demo import DemoConfig, build_default_model
from emu_inductor.ops.triton_impl import moe_triton
from emu_inductor.spec import OpSpec
m, _, x = build_default_model(DemoConfig(device="cuda", compile=False))
ex = m.experts
w, ids = m.route(x)
bad = {bad!r}
a13 = ex.w13_alpha.clone()
if bad == "w13_alpha":
    a13[1] = 0.0
if bad == "topk_ids":
    ids = ids.clone(); ids[0, 0] = 999
g1 = ex.a1_global_scale.clone()
if bad == "a1_global_scale":
    g1.fill_(float("nan"))
y = moe_triton(x, ex.w13, ex.w13_scale, a13, ex.w2, ex.w2_scale, ex.w2_alpha, w, ids, g1, ex.a2_global_scale,
               None, OpSpec.from_scheme("nvfp4_w4a4"))
torch.cuda.synchronize()
print("FINISHED", float(y.float().abs().sum()))
"""

NOSYNC = r"""
import torch
from emu_inductor.demo import DemoConfig, build_default_model
m, _, _ = build_default_model(DemoConfig(device="cuda", compile=False, tokens=4))
x = torch.randn(4, m.router.in_features, device="cuda").bfloat16()
with torch.no_grad():
    xs = [torch.randn(T, x.shape[1], device="cuda").bfloat16() for T in (1, 4, 33)]
    m(x)  # calibrate; then autotune and compile each token bucket outside the checked calls
    for xi in xs:
        m(xi)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any device-to-host sync in the layer raises
    for xi in xs:
        m(xi)
    torch.cuda.set_sync_debug_mode(0)
torch.cuda.synchronize()
print("FINISHED no sync")
"""

ok = True
p = subprocess.run([sys.executable, "-c", NOSYNC], capture_output=True, text=True, timeout=180)
nosync = "FINISHED no sync" in p.stdout
ok &= nosync
print(f"{'no_host_sync':16s} rc={p.returncode} -> {'ok' if nosync else 'WRONG'}")
if not nosync:
    print((p.stdout + p.stderr)[-1500:])
for bad in ("none", "w13_alpha", "topk_ids", "a1_global_scale"):
    p = subprocess.run([sys.executable, "-c", CASE.format(bad=bad)], capture_output=True, text=True, timeout=120)
    text = p.stdout + p.stderr
    finished = "FINISHED" in text
    named = bad in text
    good = finished if bad == "none" else (not finished and named)
    ok &= good
    print(f"{bad:16s} rc={p.returncode} finished={finished} named={named} -> {'ok' if good else 'WRONG'}")
    if not good:
        print(text[-1500:])
print("value checks ok:", ok)
