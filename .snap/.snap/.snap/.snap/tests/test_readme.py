"""The README's API example runs as written (docs that cannot drift from the code)."""

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_readme_public_api_example_runs():
    text = open(os.path.join(ROOT, "README.md")).read()
    section = text[text.index("## Public API"):]
    block = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    ns: dict = {}
    exec(compile(block, "README.md:Public API", "exec"), ns)
    assert ns["out"].shape == ns["x"].shape
    assert ns["q4"].fmt.name == "nvfp4"


def test_readme_lists_every_scheme():
    from emu_inductor.reference import SCHEMES

    text = open(os.path.join(ROOT, "README.md")).read()
    for name in SCHEMES:
        base = name.split("_a_")[0]
        assert name in text or base in text, name
