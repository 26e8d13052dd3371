"""Pattern definitions (installed as ``emu_inductor.patterns``).

Plain search functions for each way users write microscaling emulation, one module per
pattern family, plus metadata and precondition checks. This layer imports only
``emu_inductor.formats`` and ``emu_inductor.reference``; the wiring into Inductor
(register patterns, replace by ``torch.ops.mxemu.*``) lives in
``emu_inductor/passes/{linear,moe}_patterns.py``.

  dequant   weight dequantization styles (reference bit decode, vLLM LUT, FP8 upcast, MXFP6)
  act_qdq   activation fake-QDQ variants (NVFP4 vllm / vllm_ref, MX floor / even / rceil / ceil)
  gemm      GEMM forms (dense linear, torch._grouped_mm with offsets, bmm over gathered
            expert weights, an unrolled loop over experts)
  moe       the MoE structure around two GEMMs (routing prep, activation, combine)
  checks    precondition checks on matched tensors (dtypes, block size, shapes)
  opaque    register_dequant_op / register_qdq_op: user custom ops with known semantics
"""

from . import act_qdq, checks, dequant, gemm, moe, opaque  # noqa: F401
from .opaque import register_dequant_op, register_qdq_op  # noqa: F401
