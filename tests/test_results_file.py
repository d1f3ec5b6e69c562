"""RESULTS.md regenerates from the run records committed in the repository, with no MLflow store."""
from __future__ import annotations

from pathlib import Path

from launcher.results.records_cli import render

REPO = Path(__file__).resolve().parents[1]


def test_results_tables_regenerate_from_committed_records(monkeypatch):
    monkeypatch.chdir(REPO)  # the blocks name their records directories relative to the repository
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    text = (REPO / "RESULTS.md").read_text()
    assert "<!-- tdcompress compare --records " in text
    assert render(text, tracking_uri=None) == text, "RESULTS.md is out of date: tdcompress records render RESULTS.md"
