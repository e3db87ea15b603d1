"""The README's offline example runs as written."""
from __future__ import annotations

import re
from pathlib import Path


def test_readme_offline_example_runs(tmp_path, monkeypatch):
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    block = re.search(r"## Offline use.*?```python\n(.*?)```", readme, re.S).group(1)
    block = block.replace("/tmp/olora-tiny", str(tmp_path / "tiny"))
    scope: dict = {}
    exec(compile(block, "README.md", "exec"), scope)
    outs = scope["outs"]
    assert len(outs) == 2 and len(outs[0].token_ids) >= 1
    assert outs[0].finish_reason in ("stop", "length")
