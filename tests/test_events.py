"""Issue 13 item 13: typed ledger vocabularies, errors from spotrun.errors, renderers that the
report module does not import."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from spotrun.errors import ConfigError, StorageError
from spotrun.records.events import Cloud, EndReason, Market, Source
from spotrun.records.instance import InstanceInfo
from spotrun.records.layout import checkpoint_dir
from spotrun.records.ledger import Ledger
from spotrun.storage import Storage


def test_vocabularies_parse_old_spellings_and_refuse_others():
    assert Cloud.parse("ec2") is Cloud.AWS and Cloud.parse("aws") is Cloud.AWS
    assert Market.parse("on-demand") is Market.ON_DEMAND
    assert EndReason.parse(EndReason.STOPPED) is EndReason.STOPPED
    # A str, so records stay plain JSON and old comparisons keep working.
    assert json.dumps({"r": EndReason.FINISHED}) == '{"r": "finished"}' and f"{Source.LAUNCHER}" == "launcher"
    with pytest.raises(ConfigError, match="finished, interrupted, failed, stopped"):
        EndReason.parse("exploded")
    with pytest.raises(ConfigError):
        Source.parse(None)


def test_ledger_and_layout_raise_spotrun_errors(tmp_path):
    ledger = Ledger(Storage(str(tmp_path)))
    with pytest.raises(ConfigError):
        ledger.segment_ended(segment_id="s", reason="exploded", ended_at=1.0, source="wrapper")
    with pytest.raises(ConfigError):
        ledger.segment_started(segment_id="s", instance=InstanceInfo(), started_at=1.0, source="someone")
    with pytest.raises(ConfigError):
        ledger.append("x", pid=3)
    with pytest.raises(ConfigError):
        ledger.append("")
    with pytest.raises(ConfigError):
        checkpoint_dir(-1)
    # Callers that catch the builtin classes still do.
    assert issubclass(ConfigError, ValueError) and issubclass(StorageError, OSError)
    rec = ledger.segment_ended(segment_id="s", reason=EndReason.FAILED, ended_at=1.0, source=Source.LAUNCHER)
    assert (rec["reason"], rec["source"]) == ("failed", "launcher")
    assert type(rec["reason"]) is str  # what is written is the plain value


def test_report_module_does_not_import_its_renderers():
    """The report is data; text and HTML are plain functions of it (no import cycle)."""
    import spotrun.cost.report as report_mod

    tree = ast.parse(Path(report_mod.__file__).read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert not imported & {"render", "html"}
    assert not hasattr(report_mod.CostReport, "to_text") and not hasattr(report_mod.CostReport, "to_html")


def test_parse_record_reads_old_spellings_and_optional_fields():
    from spotrun.records.events import parse_record

    started = parse_record({"event": "segment_started", "time": 5.0, "segment_id": 7, "started_at": 5.0,
                            "source": "launcher", "instance": {"cloud": "ec2", "market": "spot"}})
    assert started["instance"] == {"cloud": "aws", "market": "spot"} and started["segment_id"] == "7"
    ckpt = parse_record({"event": "checkpoint_committed", "time": 6.0, "segment_id": "s", "step": 3,
                         "committed_at": 6.0})
    assert ckpt["stall_s"] == 0.0 and ckpt["save_s"] == 0.0
    other = {"event": "from_a_newer_spotrun", "time": 1.0, "anything": [1]}
    assert parse_record(other) == other
