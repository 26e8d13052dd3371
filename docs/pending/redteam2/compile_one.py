import sys, time, json, torch
import os; sys.path.insert(0, os.path.dirname(os.path.abspath(__file__))); sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", ".."))
from torch._dynamo.utils import counters
from torch._inductor.utils import run_and_get_code
import emu_inductor
from emu_inductor import _compat
from emu_inductor.passes import recording
from emu_inductor.explain import ExplainReport
from layers import LAYERS
from tests.test_corpus_compile import fusion_summary
from tests.corpus.oracle import assert_within_accumulation

name = sys.argv[1]
m, (x,) = LAYERS[name](1, torch.bfloat16)
torch._dynamo.reset(); counters.clear()
t0 = time.time()
with recording() as sink, _compat.inductor_caches_disabled(), torch.no_grad():
    out, code = run_and_get_code(torch.compile(m, backend="mxemu"), x)
    ref = m(x)
s = fusion_summary("\n".join(code))
rep = ExplainReport(candidates=list(sink.candidates), graphs=list(sink.graphs), families=(), notes=list(sink.notes), options={})
print("=== ", name, f"{time.time()-t0:.1f}s", json.dumps(s))
print("equal_bits", torch.equal(out, ref), "maxdiff", (out.float()-ref.float()).abs().max().item())
try:
    assert_within_accumulation(out, ref, name); print("within_accumulation OK")
except AssertionError as e:
    print("within_accumulation FAIL", e)
print(rep)
for c in rep.candidates:
    if not c.fused: print("FULL_REASON:", c.kind, c.node, c.reason)
