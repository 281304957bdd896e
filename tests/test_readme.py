"""The README's reliability table states how many tests each file collects: keep it true."""

from __future__ import annotations

import collections
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_reliability_table_counts_are_the_collected_counts():
    text = (ROOT / "README.md").read_text()
    section = text.split("## Reliability", 1)[1].split("\n## ", 1)[0]
    stated = {m.group(1): int(m.group(2)) for m in re.finditer(r"\| `(tests/test_\w+\.py)` \| (\d+) \|", section)}
    assert len(stated) >= 10, section
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                          *sorted(stated)], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    collected = collections.Counter(line.split("::", 1)[0] for line in out.splitlines() if "::" in line)
    assert {f: collected[f] for f in stated} == stated
