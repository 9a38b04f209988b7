"""`uffdsnap demo` — the README's first command — works and proves what it claims."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import needs_root


@needs_root
def test_demo_json() -> None:
    proc = subprocess.run([sys.executable, "-m", "uffdsnap", "demo", "--json"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["ok"] and result["verify"]["ok"] and result["consistency"]["ok"]
    summary = result["summary"]
    assert sorted(p["mode"] for p in summary["processes"]) == ["attach"] * 4 + ["enlist"] * 2
    assert summary["faults"] > 0


@needs_root
def test_demo_human(tmp_path) -> None:
    proc = subprocess.run([sys.executable, "-m", "uffdsnap", "demo", "--keep", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "consistency check: OK" in proc.stdout
    assert (tmp_path / "demo.img").exists() and (tmp_path / "demo.img.json").exists()
    verify = subprocess.run([sys.executable, "-m", "uffdsnap", "verify",
                             str(tmp_path / "demo.img")], capture_output=True, text=True)
    assert verify.returncode == 0, verify.stderr
