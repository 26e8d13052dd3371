"""Every measured figure the README quotes comes from a committed results file that names
its device, and the README names that device next to the figure.

A figure is a number with a unit (ms, s, GB, GiB, MB, MiB, %, TB/s, GB/s, TFLOP/s,
tokens/s) outside code blocks; a range "10–29%" is two figures. It is backed when a
JSON file under benchmarks/results/ that the figure's README section cites by name
(`compiled_h100.json`) has a top-level "device" that the figure's paragraph or the heading
of its section names ("H100" for "NVIDIA H100 80GB HBM3"), and holds a value of that unit
(judged by the key: `*_ms`, `*GiB*`, `pct_*`, `*GBps`, ...) which rounds to the figure at
the precision it is quoted with. Citing the file keeps the check from passing on a
coincidental value elsewhere and tells the reader where the number came from.
"""

import glob
import json
import math
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")

_NUM = r"(\d+(?:\.\d+)?)"
_UNITS = r"(tokens/s|tok/s|TFLOP/s|TFLOPs|TB/s|GB/s|GiB|GB|MiB|MB|ms|s|%)"
FIGURE = re.compile(rf"(?<![\w.]){_NUM}(?:\s*[–-]\s*{_NUM})?\s*{_UNITS}(?![\w/])")
# GPU model names as the README and torch.cuda.get_device_name() spell them
DEVICE = re.compile(r"\b(?:[ABHLV]\d{2,3}S?|B200|GB200|MI\d{3}X?|RTX ?\d{4})\b")

# unit -> [(key predicate, factor to the unit)]
_CONVERT = {
    "ms": [(lambda k: k.endswith("_ms"), 1.0), (lambda k: k.endswith("_s"), 1e3)],
    "s": [(lambda k: k.endswith("_s") and not k.endswith("tok_s"), 1.0), (lambda k: k.endswith("_ms"), 1e-3)],
    "GiB": [(lambda k: "gib" in k, 1.0), (lambda k: "mib" in k, 1 / 1024), (lambda k: k.endswith("bytes"), 2**-30)],
    "GB": [(lambda k: "gb" in k and "gbps" not in k, 1.0), (lambda k: k.endswith("bytes"), 1e-9)],
    "MiB": [(lambda k: "mib" in k, 1.0), (lambda k: k.endswith("bytes"), 2**-20)],
    "MB": [(lambda k: "mb" in k and "mbps" not in k, 1.0), (lambda k: k.endswith("bytes"), 1e-6)],
    "%": [(lambda k: "pct" in k or "percent" in k, 1.0), (lambda k: "frac" in k, 100.0)],
    "TB/s": [(lambda k: "tbps" in k, 1.0), (lambda k: "gbps" in k, 1e-3)],
    "GB/s": [(lambda k: "gbps" in k, 1.0), (lambda k: "tbps" in k, 1e3)],
    "TFLOP/s": [(lambda k: "tflop" in k, 1.0)],
    "TFLOPs": [(lambda k: "tflop" in k, 1.0)],
    "tokens/s": [(lambda k: k.endswith("tok_s") or "tokens_per_s" in k, 1.0)],
    "tok/s": [(lambda k: k.endswith("tok_s") or "tokens_per_s" in k, 1.0)],
}


def _numbers(obj, key=""):
    """(lower-cased key, value) of every number in a JSON tree."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _numbers(v, str(k).lower())
    elif isinstance(obj, list):
        for v in obj:
            yield from _numbers(v, key)
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool) and math.isfinite(obj):
        yield key, float(obj)


def load_results(folder=RESULTS):
    """[(file name, device string, [(key, value)])] of the JSON results files."""
    out = []
    for path in sorted(glob.glob(os.path.join(folder, "*.json"))):
        with open(path) as f:
            data = json.load(f)
        device = data.get("device") if isinstance(data, dict) else None
        out.append((os.path.basename(path), device, list(_numbers(data))))
    return out


def _paragraphs(text):
    """(section heading, section text, paragraph) triples, fenced code blocks dropped."""
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    for section in re.split(r"\n(?=#)", text):
        heading = section.splitlines()[0] if section.startswith("#") else ""
        for para in re.split(r"\n\s*\n", section):
            yield heading, section, para


def _backed(fig: str, unit: str, values) -> bool:
    q = float(fig)
    decimals = len(fig.split(".")[1]) if "." in fig else 0
    tol = 0.5 * 10**-decimals + 1e-9
    return any(pred(k) and abs(v * factor - q) <= tol for k, v in values for pred, factor in _CONVERT[unit])


def unbacked_figures(readme_text, results):
    """Figures in `readme_text` no device-named results file holds, with the reason."""
    problems = []
    for heading, section, para in _paragraphs(readme_text):
        named = set(DEVICE.findall(heading + "\n" + para))
        cited = {name for name, _, _ in results if name in section}
        for m in FIGURE.finditer(para):
            unit = m.group(3)
            where = " ".join(para[max(0, m.start() - 50): m.end() + 20].split())
            if not named:
                problems.append(f"{m.group(0)!r} names no device next to it: ...{where}...")
                continue
            if not cited:
                problems.append(f"{m.group(0)!r}: its section cites no benchmarks/results/ file: ...{where}...")
                continue
            values = [kv for name, dev, nums in results if name in cited and dev and any(d in dev for d in named)
                      for kv in nums]
            for fig in filter(None, (m.group(1), m.group(2))):
                if not _backed(fig, unit, values):
                    problems.append(f"{fig} {unit} ({'/'.join(sorted(named))}) is in no results file: ...{where}...")
    return problems


def test_readme_figures_come_from_results_files():
    text = open(os.path.join(ROOT, "README.md")).read()
    results = load_results()
    assert results, "no results files under benchmarks/results/"
    problems = unbacked_figures(text, results)
    assert not problems, "\n".join(problems)


def test_checker_catches_made_up_and_unattributed_figures():
    results = [("r.json", "NVIDIA H100 80GB HBM3", [("eager_ms", 46.63), ("eager_extra_gib", 16.125),
                                                     ("pct_mem_roofline", 9.8), ("pct_mem_roofline", 28.5)]),
               ("other.json", "NVIDIA H100 80GB HBM3", [("x_ms", 17.2)])]
    good = "Eager costs 46.6 ms and 16.1 GiB on an H100; 10–29% of the roofline (H100, `r.json`)."
    assert unbacked_figures(good, results) == []
    assert len(unbacked_figures("Eager costs 17 ms and 7 GB on an H100 (r.json).", results)) == 2
    assert len(unbacked_figures("Eager costs 46.6 ms (r.json).", results)) == 1  # no device named
    assert len(unbacked_figures("Eager costs 46.6 ms on an H100.", results)) == 1  # no file cited
    assert len(unbacked_figures("Eager costs 46.6 ms on an H200 (r.json).", results)) == 1  # other device
    assert len(unbacked_figures("Eager costs 46.6 s on an H100 (r.json).", results)) == 1  # wrong unit
    table = "## Measured (H100)\n\nFrom r.json:\n\n| 1 | 46.6 ms |\n\n```\n17 ms\n```\n\n## Next\n\n3 ms"
    assert len(unbacked_figures(table, results)) == 1  # only the uncited, device-less "3 ms" of the next section
