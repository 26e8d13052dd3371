"""Model widths the corpus layers are built at on the GPU (EMU_CORPUS_DIMS = "H,I,E,top_k"),
shared by bench_corpus.py, gpu_explain.py and profile_overhead.py. Importable before
tests.corpus, which reads EMU_CORPUS_DIMS when it is imported."""

SHAPES = {  # H, I, E, top_k
    "qwen3": (2048, 768, 128, 8),  # Qwen3-30B-A3B
    "gpt_oss": (2880, 2880, 32, 4),  # gpt-oss-20b
    "tiny": (64, 32, 4, 2),  # the tests' widths (CPU)
}


def corpus_dims_env(shape: str) -> str:
    """The EMU_CORPUS_DIMS value for a shape name."""
    return ",".join(str(v) for v in SHAPES[shape])
