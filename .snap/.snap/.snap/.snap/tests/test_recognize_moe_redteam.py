"""Red-team MoE structures (tests/corpus/redteam_moe.py) and the fixes they needed:

* a loop that decodes each expert's slice of the packed bytes (`deq(w13[e], s13[e], a13[e])`)
  is proven once per GEMM shape with `select(P, 0, e)` as the weight cone's leaves
  (`candidates.weight_cone`), so the per-expert GEMMs fuse and group;
* a loop selecting the tokens of an expert by a mask over the k slots, weighted by
  `(w * (ids == e)).sum(-1)`, finds the router weights (`moe_loop`: the first [T, k]
  candidate whose body is closed) and is proven on routings a top-k can give (the ids are
  `aten.topk`'s indices: `moe.topk_indices`, `moe_probes.routing_probes(distinct=True)`;
  other ids keep the routings that repeat an expert within a token);
* bytes gathered per routed row before the decode (`deq(w13[ids], s13[ids])`): the gathers
  are the weight cone's leaves (`candidates.gathered_rows`), not the router behind the ids;
  a look-up `lut[code]` stays inside the cone;
* gate and up as two grouped GEMMs over the same rows become one (`semantic_gate_up`) with
  the option `semantic_gate_up.merge` (default off: the merge copies both packed stacks on
  every call; the corpus smoke test of `redteam_histc_split_gate_up_moe` checks the default
  leaves three grouped GEMMs, the test below the merged mxemu::moe); a grouped
  GEMM over gathered bytes becomes one over the stacks (`semantic_regather`), covered by
  `redteam_gather_codes_bmm_moe` (one mxemu::moe).
"""

import torch
from torch._dynamo.utils import counters
from torch._inductor.utils import run_and_get_code

import emu_inductor
from emu_inductor import _compat
from emu_inductor.passes import recording
from tests.corpus.oracle import assert_within_accumulation

from emu_inductor.formats import MXFP4, NVFP4
from emu_inductor.recognize import WeightVerdict, gemm_nodes, recognize_weight
from emu_inductor.recognize.candidates import weight_cone
from emu_inductor.recognize.moe import topk_indices
from emu_inductor.recognize.moe_probes import activation_routings, routing_probes
from emu_inductor.reference import dequantize_weight
from tests.corpus import BY_NAME
from tests.corpus.data import tokens
from tests.corpus.redteam_moe import FP4_MAGNITUDES, mxfp4_dequant, nvfp4_dequant
from tests.test_recognize_moe_loop import _compile
from tests.test_recognize_weight import leaves, trace


def test_expert_slice_decode_is_proven_with_the_slices_as_leaves():
    E, N, K, e = 4, 48, 64, 2
    w, s, a = leaves(7, N=N, K=K, E=E, fmt=NVFP4)
    table = torch.tensor(FP4_MAGNITUDES)
    x = torch.randn(4, K, dtype=torch.bfloat16)

    def layer(x, w, s, a, table):
        return x @ nvfp4_dequant(w[e], s[e], a[e], table, x.dtype).t()

    gm = trace(layer, x, w, s, a, table)
    (gemm,) = gemm_nodes(gm.graph)
    cone, _ = weight_cone(gemm)
    sliced = [n for n in cone.leaves if n.op == "call_function"]
    assert sliced and all(n.target is torch.ops.aten.select.int and n.args[2] == e for n in sliced), cone.leaves
    v = recognize_weight(gemm, use_cache=False, values={n: table for n in cone.leaves if n.op == "placeholder"
                                                        and n.meta["val"].shape == table.shape})
    assert isinstance(v, WeightVerdict), v.reason
    assert v.variant.fmt == "nvfp4" and v.kernel_supported
    assert {v.codes, v.scale} <= set(sliced)
    for seed in (11, 12):  # the verdict's reference is the user's decode on fresh bytes
        w, s, a = leaves(seed, N=N, K=K, E=E, fmt=NVFP4)
        want = dequantize_weight(w[e], s[e], NVFP4, alpha=a[e], dtype=torch.bfloat16)
        assert torch.equal(nvfp4_dequant(w[e], s[e], a[e], table, torch.bfloat16), want)


def test_codes_gathered_by_routed_ids_are_leaves():
    E, N, K = 4, 48, 64
    w, s, _ = leaves(8, N=N, K=K, E=E, fmt=MXFP4)
    table = torch.tensor(FP4_MAGNITUDES)
    x, r = torch.randn(6, 1, K, dtype=torch.bfloat16), torch.randn(E, K, dtype=torch.bfloat16)

    def layer(x, r, w, s, table):
        ids = torch.argmax(x[:, 0] @ r.t(), dim=-1)
        return torch.bmm(x, mxfp4_dequant(w[ids], s[ids], table, x.dtype).transpose(1, 2))

    gm = trace(layer, x, r, w, s, table)
    (gemm,) = [n for n in gemm_nodes(gm.graph) if n.target is torch.ops.aten.bmm.default]
    cone, _ = weight_cone(gemm)
    gathers = [n for n in cone.leaves if n.op == "call_function"]
    assert len(gathers) == 2 and all(n.target is torch.ops.aten.index.Tensor for n in gathers), cone.leaves
    assert not any(n.target in (torch.ops.aten.mm.default, torch.ops.aten.argmax.default) for n in cone.nodes)
    assert any(n.target is torch.ops.aten.index.Tensor for n in cone.nodes)  # table[code] stays inside
    v = recognize_weight(gemm, use_cache=False, values={n: table for n in cone.leaves if n.op == "placeholder"})
    assert isinstance(v, WeightVerdict), v.reason
    assert v.variant.fmt == "mxfp4" and {v.codes, v.scale} == set(gathers)


def test_topk_indices_and_distinct_probe_routings():
    def f(x, r):
        w, ids = torch.topk(torch.softmax(x @ r.t(), -1), 2, dim=-1)
        return ids.to(torch.int32), torch.argsort(x, -1)[:, :2]

    gm = trace(f, torch.randn(5, 8), torch.randn(4, 8))
    out = [n for n in gm.graph.nodes if n.op == "output"][0].args[0]
    assert topk_indices(out[0]) and not topk_indices(out[1])
    g = torch.Generator().manual_seed(0)
    probes = routing_probes(16, 8, 2, 4, torch.bfloat16, torch.float32, torch.int64, g, distinct=True)
    probes += activation_routings(16, 8, 2, 4, torch.bfloat16, torch.float32, torch.int64, g, distinct=True)
    for what, _, ids, _ in probes:
        assert all(len(set(r)) == 2 for r in ids.tolist()), what
    assert any(set(ids.flatten().tolist()) != {0, 1, 2, 3} for _, _, ids, _ in probes)  # an empty expert
    rand = routing_probes(16, 8, 2, 4, torch.bfloat16, torch.float32, torch.int64, g)
    assert any(len(set(r)) == 1 for _, _, ids, _ in rand for r in ids.tolist())  # not top-k ids: repeats probed


def _all_hit(m, seed):
    for s in range(seed, seed + 50):
        x = tokens(s, 16, 64)
        if m.route(x)[1].unique().numel() == 4:
            return x
    raise AssertionError("no token batch hits every expert")


def test_token_mask_loop_decoding_each_expert_is_one_moe():
    entry = BY_NAME["redteam_token_mask_decode_loop_moe"]
    m, _ = entry.make(1, torch.bfloat16)
    code, records = _compile(m, _all_hit(m, 3), flags=True, x2=_all_hit(m, 60))
    assert counters["mxemu_ops"] == {"moe": 1}, ([r.reason for r in records], dict(counters["mxemu_ops"]))
    assert code.count("torch.ops.mxemu.moe.default(") == 1
    assert counters["mxemu"]["semantic_group"] == 2 and counters["mxemu"]["semantic_loop_moe"] == 1


def test_separate_gate_up_stacks_merge_into_one_moe_only_when_asked():
    entry = BY_NAME["redteam_histc_split_gate_up_moe"]
    m, (x,) = entry.make(1, torch.bfloat16)
    counters.clear()
    torch._dynamo.reset()
    backend = emu_inductor.backend(**{"semantic_gate_up.merge": True})
    with _compat.inductor_caches_disabled(), recording() as sink, torch.no_grad():
        compiled = torch.compile(m, backend=backend)
        out, code = run_and_get_code(compiled, x)
        assert_within_accumulation(out, m(x), entry.name)
        x2 = torch.randn(x.shape).to(torch.bfloat16) * 3  # fresh inputs, same graph
        assert_within_accumulation(compiled(x2), m(x2), entry.name + " (fresh inputs)")
    code = "\n".join(code)
    assert counters["mxemu"]["semantic_gate_up"] == 1, [r.reason for r in sink.candidates]
    assert code.count("torch.ops.mxemu.moe.default(") == 1 and "mxemu.grouped_mm" not in code
