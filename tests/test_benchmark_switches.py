"""The benchmark scripts' switch sets: ``kda_variants.parse`` and ``switches`` (set around a measurement,
restored after it, also when it fails)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from kda_variants import parse, switches  # noqa: E402


def test_parse_adds_the_prefix_and_names_a_bad_spec():
    assert parse("BT=32,KIMI_LINEAR_KDA_RECUR=wgmma") == {"KIMI_LINEAR_KDA_BT": "32", "KIMI_LINEAR_KDA_RECUR": "wgmma"}
    with pytest.raises(SystemExit, match="RECUR"):
        parse("RECUR")


def test_switches_restore_the_environment(monkeypatch):
    monkeypatch.setenv("KIMI_LINEAR_KDA_BT", "16")
    monkeypatch.delenv("KIMI_LINEAR_KDA_RECUR", raising=False)
    with pytest.raises(RuntimeError):
        with switches(parse("BT=32,RECUR=wgmma")):
            assert os.environ["KIMI_LINEAR_KDA_BT"] == "32" and os.environ["KIMI_LINEAR_KDA_RECUR"] == "wgmma"
            raise RuntimeError("a failed measurement")
    assert os.environ["KIMI_LINEAR_KDA_BT"] == "16" and "KIMI_LINEAR_KDA_RECUR" not in os.environ
