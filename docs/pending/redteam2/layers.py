"""The red-team round 2 layers now live in tests/corpus/redteam2.py (corpus entries rt2_*);
this name is kept for compile_one.py and eager.py."""
from tests.corpus.redteam2 import LAYERS  # noqa: F401
