"""The README's Python API snippet runs as written (under mpiexec -n 2): the docs cannot rot.

The block is the fenced ```python block after the marker line
``<!-- readme-test: python-api -->``; it runs in a fresh directory as a user's script.
"""
import os
import re
import sys

import numpy as np
import pytest

from joblaunch import MPIEXEC, run_job

pytestmark = pytest.mark.skipif(not os.path.exists(MPIEXEC), reason="mpiexec not in the venv")
README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
MARKER = "<!-- readme-test: python-api -->"


def snippet(text: str, marker: str = MARKER) -> str:
    """The fenced python block right after ``marker`` (one, or a clear failure)."""
    m = re.search(re.escape(marker) + r"\n```python\n(.*?)\n```\n", text, re.S)
    assert m, f"README.md: no ```python block right after {marker}"
    return m.group(1) + "\n"


def test_the_python_api_snippet_runs_on_two_ranks(tmp_path):
    with open(README) as f:
        code = snippet(f.read())
    script = tmp_path / "readme_api.py"
    script.write_text(code)
    p, _ = run_job([sys.executable, str(script)], 2, timeout=240, cwd=str(tmp_path))
    assert p.returncode == 0, p.stdout + p.stderr
    acc = float(re.search(r"^test accuracy (\d\.\d+)", p.stdout, re.M).group(1))
    assert acc > 0.8, p.stdout                           # 2 epochs of an MLP on digits
    assert "2 rank(s) as dp=1 x tp=2" in p.stdout
    with np.load(tmp_path / "mlp.npz") as z:            # gather_state: whole tensors
        assert {k: z[k].shape for k in z.files} == {
            "1.weight": (128, 64), "1.bias": (128,), "3.weight": (10, 128), "3.bias": (10,)}
    assert (tmp_path / "runs" / "api-demo" / "metrics.jsonl").exists()


def test_the_snippet_is_found_only_after_its_marker():
    text = f"intro\n```python\nnot this\n```\n{MARKER}\n```python\nprint(1)\n```\n"
    assert snippet(text) == "print(1)\n"
    with pytest.raises(AssertionError, match="no ```python block"):
        snippet("```python\nprint(1)\n```\n")
