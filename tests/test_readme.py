"""The README's Python example runs as written (on the embedded model), and prints what it says."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import copy_cache

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_python_example_runs(tmp_path, embedded_cache_template):
    block = re.search(r"```python\n(.*?)```", README.read_text(), re.S)
    assert block, "the README shows the Python API first"
    code = block.group(1)
    assert "Pipeline.from_pretrained()" in code and "submit" in code and "stream" in code
    cache = copy_cache(embedded_cache_template, tmp_path / "cache")  # its first export is tested elsewhere
    env = {"BITDANCE_RT_CACHE": str(cache), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    res = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert (tmp_path / "three.png").is_file()
    lines = res.stdout.splitlines()
    assert sum(line.startswith("Progress(step=") for line in lines) == 3  # 4 AR steps: 3 progress events
    assert lines[-1].startswith("Output(1 image(s) of 32x32, labels=[5], ")


def test_readme_server_example_works_as_printed(tmp_path, embedded_cache_template):
    """`bitdance-rt serve` as the README shows it, and its openai client example, prints what the
    README says it prints (on a free port instead of 8000)."""
    pytest.importorskip("fastapi")
    pytest.importorskip("openai")
    from serve_util import free_port, server_process

    text = README.read_text()
    section = text[text.index("## HTTP server") :]
    command = re.search(r"```bash\n(bitdance-rt serve[^\n#]*)", section).group(1).split()
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    printed = re.search(r"\nprints[^\n]*\n\n```\n(.*?)```", section, re.S).group(1)
    assert command[:2] == ["bitdance-rt", "serve"] and "8000" in code
    port = free_port()
    env = {"BITDANCE_RT_CACHE": str(copy_cache(embedded_cache_template, tmp_path / "cache")), "OMP_NUM_THREADS": "1"}
    with server_process(command[2:], env, port) as proc:
        res = subprocess.run(
            [sys.executable, "-c", code.replace("8000", str(port))],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.poll() is None
    assert res.returncode == 0, res.stderr[-2000:]
    assert [line.rstrip() for line in res.stdout.splitlines()] == [line.rstrip() for line in printed.splitlines()]
    from PIL import Image

    for i in range(2):
        with Image.open(tmp_path / f"seven_{i}.png") as image:
            assert image.format == "PNG" and image.size == (32, 32)


DOCS = README.parent / "docs"
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def github_anchors(text: str) -> Iterator[str]:
    """The anchors GitHub gives a Markdown file's headings: lower case, punctuation dropped, spaces to
    hyphens, a repeated heading numbered -1, -2, ..."""
    seen: dict[str, int] = {}
    for heading in re.findall(r"^#{1,6} +(.+?) *#* *$", re.sub(r"```.*?```", "", text, flags=re.S), re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        yield slug if n == 0 else f"{slug}-{n}"


def test_readme_is_a_front_page():
    assert len(README.read_text().splitlines()) <= 250


@pytest.mark.parametrize("page", [README, *sorted(DOCS.glob("*.md"))], ids=lambda p: p.name)
def test_relative_links_point_to_existing_files(page):
    """Every relative link (and image) in the README and the docs pages names a file that exists, and a
    link to a heading (#anchor) names a heading that the target page has."""
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)  # code blocks hold no links
    text = re.sub(r"`[^`\n]*`", "", text)
    broken = []
    for target in LINK.findall(text):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:, ...
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(target)
        elif anchor and file.suffix == ".md" and anchor not in set(github_anchors(file.read_text())):
            broken.append(target)
    assert not broken, f"{page.name}: links to nothing: {broken}"
