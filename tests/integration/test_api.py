"""``polydistill.run`` from Python: the same job as ``polydistill run``, its report returned typed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import polydistill

TINY = Path(__file__).resolve().parents[2] / "examples" / "tiny.yaml"
pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_run_returns_the_report_it_writes(tmp_path):
    report = polydistill.run(TINY, tmp_path / "out", training__epochs=1, **{"teacher.replicas": 1})
    assert isinstance(report, polydistill.Report)
    assert report.samples_distilled == report.samples_expected > 0 and report.epochs == 1
    written = json.loads((tmp_path / "out" / "report.json").read_text())
    assert written == report.as_json_dict()
