"""tables.py renders what the benches of this session wrote (smoke mode), so that the path from
extra_info to the README's tables cannot rot either. It runs after the other bench files (pytest
collects files in name order) and skips when run alone."""

from __future__ import annotations

import datetime

import pytest

from . import tables
from .conftest import SMOKE_RECORDS


def test_tables_render_what_the_benches_wrote():
    if not SMOKE_RECORDS:
        pytest.skip("no bench ran before this test in this session: run benches/ as a whole")
    doc = {"machine_info": {"python_version": "smoke", "cpu": {"brand_raw": "smoke"}}, "commit_info": {},
           "datetime": datetime.datetime.now(datetime.timezone.utc).isoformat(), "benchmarks": SMOKE_RECORDS}
    text = tables.render(doc, "pytest -q benches/ (smoke)")
    groups = {r["group"] for r in SMOKE_RECORDS}
    assert groups <= set(tables.GROUPS), groups
    for group in groups:
        assert f"### {tables.TITLES[group]}" in text
    goals = [g for r in SMOKE_RECORDS for g in r["extra_info"]["goals"]]
    if goals:
        assert f"of {len(goals)} met" in text
    assert "SMOKE RUN" in text
