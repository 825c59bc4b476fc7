"""docs/architecture.md's code map lists every module of rm_trainer with its docstring's first sentence,
and is regenerated, never edited: this fails when it is stale (run python tools/code_map.py)."""

from __future__ import annotations

import subprocess
import sys

from helpers import ROOT, run_env


def test_the_code_map_is_current():
    p = subprocess.run([sys.executable, "tools/code_map.py", "--check"], cwd=ROOT, env=run_env(),
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr


def test_the_code_map_names_every_module():
    sys.path.insert(0, str(ROOT / "tools"))
    import code_map

    listed = {path for path, _ in code_map.entries()}
    on_disk = {str(p.relative_to(ROOT / "rm_trainer")) for p in (ROOT / "rm_trainer").rglob("*.py")}
    assert listed == on_disk
