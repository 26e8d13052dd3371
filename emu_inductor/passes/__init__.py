"""Pass infrastructure for the mxemu backend: the pattern-family registry, the
``MxemuPass`` post-grad pass, and the helpers pattern authors use.

Public API for pattern modules (``patterns/*.py``)::

    from emu_inductor.passes import (
        register_pattern_family, unregister_pattern_family, registered_families,
        register_replacement, register_shape_agnostic_replacement, shape_agnostic_pattern,
        fwd_only_post_grad, ANY_SHAPE, meta_val, known_true,
        record_candidate, get_option,
    )

Pattern modules may import ``emu_inductor.passes.registry``, ``.helpers`` and
``.recorder`` (the pass imports ``emu_inductor.patterns`` lazily, so there is no cycle).
"""

from __future__ import annotations

from .helpers import (
    ANY_SHAPE,
    DEFAULT_SHAPE_ARGS,
    fwd_only_post_grad,
    known_true,
    meta_val,
    register_replacement,
    register_shape_agnostic_replacement,
    shape_agnostic_pattern,
)
from .mxemu_pass import MxemuPass, chain_passes, pass_uuid_files, strip_mxemu_passes
from .recorder import CandidateRecord, GraphRecord, record_candidate, recording
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
    "GraphRecord",
    "MxemuPass",
    "PatternFamily",
    "chain_passes",
    "current_options",
    "fwd_only_post_grad",
    "get_option",
    "get_pattern_family",
    "known_true",
    "load_builtin_families",
    "meta_val",
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
