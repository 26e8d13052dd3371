"""The mxemu post-grad pass, its pattern families, and the API for pattern authors.

Public API (what tests, docs and user pattern families use)::

    from emu_inductor.passes import (
        MxemuPass, chain_passes, strip_mxemu_passes, pass_uuid_files,      # the pass
        register_pattern_family, unregister_pattern_family, registered_families,
        get_pattern_family, load_builtin_families, resolve_options, get_option,
        current_options, CORE_OPTIONS, PatternFamily,                       # families, options
        register_replacement, register_shape_agnostic_replacement, shape_agnostic_pattern,
        fwd_only_post_grad, ANY_SHAPE, DEFAULT_SHAPE_ARGS, meta_val, known_true,  # matching
        record_candidate, recording, CandidateRecord, GraphRecord,         # explain() records
    )

Modules, one job each:
  registry        pattern families and the mxemu.* options
  matching        the one pattern-building API (ANY_SHAPE, SHAPE_ARGS, register_replacement)
  tracing         tracing search functions as the user's graph was produced
  surgery         shape-agnostic patterns from traces; composing pattern pieces
  runtime_guards  run-time assertions a fusion relies on (float constants, LUT inputs)
  guards          the guard layer: a family's failure never breaks the user's compile
  recorder        the one recorder behind explain() and the debug log
  opaque_ops      declared opaque user ops as pattern pieces
  fingerprint     the files and config hashed into the pass uuid
  pieces          the catalogue's styles traced as pattern pieces; which pairs exist
  linear / grouped_mm / moe   the built-in families (imported lazily by the registry)
  mxemu_pass      MxemuPass itself;  chain: installing it next to a user's pass
  verify          mxemu.verify: fused outputs checked against their original subgraph at run time
The families refer to the fused ops only as ``torch.ops.mxemu.*``.
"""

from __future__ import annotations

from .chain import chain_passes, strip_mxemu_passes
from .fingerprint import pass_uuid_files
from .matching import (
    ANY_SHAPE,
    DEFAULT_SHAPE_ARGS,
    fwd_only_post_grad,
    known_true,
    meta_val,
    register_replacement,
    register_shape_agnostic_replacement,
    shape_agnostic_pattern,
)
from .guards import describe_error
from .mxemu_pass import MxemuPass
from .recorder import (
    CandidateRecord,
    FusionCounts,
    GraphRecord,
    cache_replay,
    fusion_counts,
    note,
    record_candidate,
    recording,
)
from .registry import (
    CORE_OPTIONS,
    PatternFamily,
    current_options,
    get_option,
    get_pattern_family,
    load_builtin_families,
    register_pattern_family,
    registered_families,
    resolve_options,
    unregister_pattern_family,
)

__all__ = [
    "ANY_SHAPE",
    "CORE_OPTIONS",
    "DEFAULT_SHAPE_ARGS",
    "CandidateRecord",
    "FusionCounts",
    "GraphRecord",
    "MxemuPass",
    "PatternFamily",
    "cache_replay",
    "chain_passes",
    "current_options",
    "describe_error",
    "fusion_counts",
    "fwd_only_post_grad",
    "get_option",
    "get_pattern_family",
    "known_true",
    "load_builtin_families",
    "meta_val",
    "note",
    "pass_uuid_files",
    "record_candidate",
    "recording",
    "register_pattern_family",
    "register_replacement",
    "register_shape_agnostic_replacement",
    "registered_families",
    "resolve_options",
    "shape_agnostic_pattern",
    "strip_mxemu_passes",
    "unregister_pattern_family",
]
