"""The README's Python example runs as written (on the embedded model), and prints what it says."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_python_example_runs(tmp_path):
    block = re.search(r"```python\n(.*?)```", README.read_text(), re.S)
    assert block, "the README shows the Python API first"
    code = block.group(1)
    assert "Pipeline.from_pretrained()" in code and "submit" in code and "stream" in code
    env = {"BITDANCE_RT_CACHE": str(tmp_path / "cache"), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    assert (tmp_path / "three.png").is_file()
    lines = res.stdout.splitlines()
    assert sum(line.startswith("Progress(step=") for line in lines) == 3  # 4 AR steps: 3 progress events
    assert lines[-1].startswith("Output(1 image(s) of 32x32, labels=[5], ")
