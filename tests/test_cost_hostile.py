"""Issue 13 items 9 and 12: ledger records are data from anyone who can write to the bucket.

Bad records (NaN or absurd times, wrong types, unknown reasons) are skipped with a warning
and the rest still priced; every value that reaches the HTML page is escaped.
"""

from __future__ import annotations

import json
import math
from html.parser import HTMLParser

import pytest
from test_cost_report import T0, write_two_segment_run

from spotrun.cli import main
from spotrun.storage import Storage

PRICES = ["--offline", "--spot-price", "0.3", "--on-demand-price", "1.0"]


def _raw(url: str, name: str, record: dict) -> None:
    # Straight to storage, as a damaged or malicious writer would (NaN and all).
    Storage(url).write_bytes(f"ledger/{name}.json", json.dumps(record).encode())


BAD = {
    "nan-time": {"event": "checkpoint_committed", "time": math.nan, "segment_id": "A", "step": 7,
                 "committed_at": T0 + 700, "stall_s": 1.0, "save_s": 1.0, "nbytes": 1},
    "huge-end": {"event": "segment_ended", "time": T0 + 1, "segment_id": "A", "reason": "interrupted",
                 "ended_at": 1e300, "source": "launcher"},
    "inf-stall": {"event": "checkpoint_committed", "time": T0 + 5, "segment_id": "B", "step": 7,
                  "committed_at": T0 + 2500, "stall_s": math.inf, "save_s": 1.0, "nbytes": 1},
    "text-step": {"event": "checkpoint_committed", "time": T0 + 5, "segment_id": "B", "step": "ten",
                  "committed_at": T0 + 2500, "stall_s": 1.0, "save_s": 1.0, "nbytes": 1},
    "list-instance": {"event": "segment_started", "time": T0, "segment_id": "C", "instance": [1, 2],
                      "started_at": T0, "source": "launcher"},
    "bad-reason": {"event": "segment_ended", "time": T0 + 3, "segment_id": "A", "reason": "exploded",
                   "ended_at": T0 + 3, "source": "wrapper"},
    "bool-first-step": {"event": "training_resumed", "time": T0, "segment_id": "B", "step": True,
                        "process_started_at": T0, "first_step_at": T0 + 1},
    "no-segment": {"event": "notice_received", "time": T0, "source": "ec2", "action": "terminate",
                   "detected_at": T0, "notice_time": None, "deadline": None},
}


def test_cost_skips_bad_records_and_prices_the_rest(tmp_path, capsys):
    clean = str(tmp_path / "clean")
    write_two_segment_run(clean)
    assert main(["cost", clean, "--json", *PRICES]) == 0
    expected = json.loads(capsys.readouterr().out)["totals"]

    url = str(tmp_path / "run")
    write_two_segment_run(url)
    for name, record in BAD.items():
        _raw(url, f"{int(T0 * 1e9):020d}-{name}", record)
    assert main(["cost", url, "--json", *PRICES]) == 0
    out = capsys.readouterr()
    d = json.loads(out.out)
    assert d["totals"] == expected
    skipped = [w for w in d["warnings"] if w.startswith("skipped ledger record")]
    assert len(skipped) == len(BAD)
    for name in BAD:
        assert any(name in w for w in skipped), name
    # Text and HTML render the same ledger without a traceback.
    assert main(["cost", url, *PRICES, "--html", str(tmp_path / "r.html")]) == 0
    assert "skipped ledger record" in capsys.readouterr().out


HOSTILE = '"><img src=x onerror=alert(1)><script>alert(2)</script>&'

ALLOWED_TAGS = {
    "html", "head", "meta", "title", "style", "body", "h1", "h2", "p", "span", "table", "thead",
    "tbody", "tr", "th", "td", "ul", "li", "svg", "defs", "pattern", "rect", "line", "text", "g",
    "polygon", "polyline", "path", "circle", "small", "strong", "em", "abbr", "sup", "div",
}


class _Tags(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


@pytest.fixture()
def hostile_run(tmp_path):
    url = str(tmp_path / "run")
    h = HOSTILE
    inst = {"cloud": "aws", "instance_id": h, "instance_type": h, "region": h, "availability_zone": h,
            "market": "spot"}
    records = [
        {"event": "segment_started", "time": T0, "segment_id": h, "instance": inst, "started_at": T0,
         "source": "launcher", "host": h, "pid": h, "id": h},
        {"event": "training_resumed", "time": T0 + 10, "segment_id": h, "step": 0,
         "process_started_at": T0 + 5, "first_step_at": T0 + 10, "extra": h},
        {"event": "checkpoint_committed", "time": T0 + 100, "segment_id": h, "step": 5,
         "committed_at": T0 + 100, "stall_s": 1.0, "save_s": 2.0, "nbytes": 3},
        {"event": "notice_received", "time": T0 + 150, "segment_id": h, "source": h, "action": h,
         "notice_time": T0 + 149, "detected_at": T0 + 150, "deadline": T0 + 270},
        {"event": "segment_ended", "time": T0 + 200, "segment_id": h, "reason": "interrupted",
         "ended_at": T0 + 200, "source": "launcher"},
    ]
    # And every field hostile in turn (numbers, vocabularies): each such record is skipped,
    # and its warning, which quotes the value, is escaped too.
    for i, base in enumerate(records):
        for key in base:
            if key in ("event", "time", "segment_id"):
                continue
            _raw(url, f"{int((T0 + 300 + i) * 1e9):020d}-{i}-{key}", {**base, key: h})
    for i, r in enumerate(records):
        _raw(url, f"{int(r['time'] * 1e9):020d}-ok{i}", r)
    return url


def test_every_ledger_value_is_escaped_in_the_html(hostile_run, tmp_path, capsys):
    out = tmp_path / "r.html"
    assert main(["cost", hostile_run, *PRICES, "--html", str(out)]) == 0
    page = out.read_text()
    parser = _Tags()
    parser.feed(page)
    parser.close()
    tags = {t for t, _ in parser.tags}
    assert tags <= ALLOWED_TAGS, tags - ALLOWED_TAGS
    for _, attrs in parser.tags:
        assert not [k for k in attrs if k.startswith("on")]
    assert "<script" not in page and "<img" not in page
    assert "&lt;script&gt;alert(2)" in page  # the value is shown, escaped
    assert page.count("skipped ledger record") >= 5
