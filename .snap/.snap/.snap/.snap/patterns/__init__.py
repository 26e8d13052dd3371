"""Pattern definitions: the design card of the ways users write microscaling emulation
(installed as ``emu_inductor.patterns``; the repository keeps it at the top level).

Plain search functions, one module per kind, plus metadata and precondition checks.
This layer imports only ``emu_inductor.formats``, ``emu_inductor.spec`` and
``emu_inductor.reference``; the wiring into Inductor (register patterns, replace by
``torch.ops.mxemu.*``) lives in ``emu_inductor/passes/{linear,grouped_mm,moe}.py``.

  catalogue  the one catalogue: styles registered by decorator with their GEMM forms
  dequant    weight dequantization styles (reference bit decode, vLLM LUT, FP8 upcast,
             NVFP4 gate/up global scales)
  act_qdq    activation fake-QDQ variants (NVFP4 vllm / vllm_ref, MX floor / even / rceil /
             ceil, per-tensor FP8 dynamic and static, vLLM's torch NVFP4 QDQ)
  gemm       GEMM forms (dense linear, torch._grouped_mm with offsets, bmm over gathered
             expert weights, an unrolled loop over experts)
  moe        the MoE structure around two GEMMs (routing prep, activation, combine)
  checks     precondition checks on matched tensors (dtypes, block size, shapes)
  opaque     register_dequant_op / register_qdq_op: user custom ops with known semantics

A new style is one factory in ``dequant.py`` or ``act_qdq.py`` (or a new module imported
below) decorated with ``catalogue.dequant_style(...)`` / ``catalogue.qdq_style(...)``.
"""

from . import catalogue  # noqa: F401  (first: the style modules register into it)
from . import act_qdq, checks, dequant, gemm, moe, opaque  # noqa: F401
from .opaque import register_dequant_op, register_qdq_op  # noqa: F401
