"""Test setup shared by every test module.

TRITON_INTERPRET is read when a @triton.jit decorator runs, so it is set here, before
any module that defines kernels is imported: on a machine without a GPU the generated
kernels run under Triton's interpreter.
"""

import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Tests run from a source checkout as well as from an installed package.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
