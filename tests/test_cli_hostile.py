"""Hostile and careless input at the CLI surface (issue 20, issue 23): each case is one line
and the right exit code, and nothing the CLI prints can harm the user's terminal."""

from __future__ import annotations

import subprocess
import sys

import pytest

from spotrun.units import format_bytes


@pytest.mark.parametrize(
    "n, text",
    [(0, "0 B"), (512, "512 B"), (1536, "1.50 KiB"), (10 * 1024, "10.0 KiB"),
     (1024**2 - 1, "1.00 MiB"), (123 * 1024**2, "123 MiB"), (5 * 1024**3, "5.00 GiB")],
)
def test_format_bytes_picks_the_unit_that_fits(n: int, text: str) -> None:
    assert format_bytes(n) == text


def test_ls_prints_a_small_checkpoint_in_bytes_not_zero_mb(tmp_path, capsys) -> None:
    import torch

    from spotrun.checkpoint import Checkpointer
    from spotrun.cli import main

    model = torch.nn.Linear(2, 1)
    with Checkpointer(str(tmp_path / "run"), model=model, every_steps=1, async_save=False,
                      handle_signals=False, watchers=[]) as ck:
        ck.step()
    assert main(["ls", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert " B  committed" in out or "KiB  committed" in out, out
    assert "0.0" not in out


# -- issue 20: no SDK chatter before a one-line error at the default verbosity -------------


def _spotrun(env: dict, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "spotrun.cli", *args], env=env, capture_output=True,
                          text=True, timeout=120, check=False)


@pytest.mark.parametrize("command", [["ls"], ["verify"], ["status", "--no-aws"], ["cost", "--offline"]])
def test_missing_bucket_is_exactly_one_line_on_stderr(child_env: dict, moto_server: str, command: list) -> None:
    env = dict(child_env, AWS_ENDPOINT_URL=moto_server)
    r = _spotrun(env, command[0], "s3://no-such-bucket/run", *command[1:])
    assert r.returncode == 2, r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("spotrun: error:"), r.stderr


def test_v_lets_sdk_info_through_and_default_does_not(child_env: dict, moto_server: str) -> None:
    env = dict(child_env, AWS_ENDPOINT_URL=moto_server)
    r = _spotrun(env, "-v", "ls", "s3://no-such-bucket/run")
    assert r.returncode == 2
    assert "botocore" in r.stderr and " INFO " in r.stderr, r.stderr  # -v: as its help says


# -- issue 20: secret shapes that passed the --env check; the log filter masks the same -----

JWT = ("eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIiwibmFtZSI6IkphbmUifQ."
       "SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c")
NEW_SHAPES = {
    "a JWT": JWT,
    "a Stripe live key": "sk_live_" + "4eC39HqLyjWDarjtT1zdp7dc",
    "a Stripe restricted key": "rk_test_" + "51H8abcdefghijklmnopqrst",
    "a Google API key": "AIza" + "SyD-9tSrke72PouQMnMX-a7eZSW0jkFMBWY",
    "a Slack webhook URL": "https://hooks.slack.com/services/" + "T00000000/B00000000/XXXXXXXXXXXXXXXXXXXXXXXX",
    "a bearer token": "Bearer " + "abcDEF0123456789ghiJKL",
}


@pytest.mark.parametrize("kind", sorted(NEW_SHAPES))
def test_env_refuses_the_new_secret_shapes(kind: str, capsys: pytest.CaptureFixture, monkeypatch) -> None:
    from conftest import free_port

    from spotrun.cli import main

    # Nothing may be asked of AWS before the check: an endpoint where nothing listens.
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    code = main(["launch", "--run-url", "s3://bucket/run", "--instance-types", "g5.xlarge",
                 "--region", "us-east-1", "--ami", "ami-12345678", "--env", f"VALUE={NEW_SHAPES[kind]}",
                 "--", "python", "t.py"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and "--env VALUE" in err and "--secret" in err, err


@pytest.mark.parametrize("kind", sorted(NEW_SHAPES))
def test_log_redaction_masks_the_same_shapes(kind: str) -> None:
    from spotrun.cli.redact import redact

    line = f"calling the service with {NEW_SHAPES[kind]} now"
    clean = redact(line)
    assert "<redacted>" in clean
    # What identifies the secret is gone (a bearer's word may stay, its token may not).
    assert NEW_SHAPES[kind].split()[-1][-12:] not in clean


@pytest.mark.parametrize("value", ["Bearer $API_TOKEN", "eyJ-not-a-jwt", "https://hooks.slack.com/",
                                   "AIza-too-short", "sk_live_short", "gpt2-medium", "bearer of news"])
def test_ordinary_values_still_pass_the_env_check(value: str) -> None:
    from spotrun.launch.userdata import check_no_secrets

    check_no_secrets(setup=[], env={"VALUE": value}, command=["python", "t.py"])


# -- issue 20: spotrun logs never hands control sequences to the terminal -------------------

HOSTILE_OUTPUT = (
    b"step 1\n"
    b"\x1b]0;window title\x07"            # OSC 0: window title
    b"\x1b]52;c;Y3VybCBldmlsIHwgc2g=\x1b\\"  # OSC 52: clipboard write, ST-terminated
    b"\x1b[6n"                            # cursor-position query: the terminal types an answer
    b"\x1b[2J\x1b[H"                      # clear screen, cursor home
    b"\x1b[?1049h"                        # alternate screen
    b"\x9b31m\xc2\x9b2J"                  # 8-bit CSI, raw and as UTF-8 C1
    b"\xe2\x80\xaeevil\xe2\x80\xac"       # bidi override
    b"\x1b[1;32mgreen\x1b[0m\tok\r\n"     # colour and tab: kept
    b"progress 50%\rprogress 100%\x1b[3"  # carriage returns; colour cut off at the chunk's end
)
SECOND_CHUNK = b"1mred\n"


def _hostile_run(tmp_path) -> str:
    from spotrun.launch.logs import log_chunk_path
    from spotrun.storage import Storage

    url = str(tmp_path / "run")
    st = Storage(url)
    st.write_bytes(log_chunk_path("sim-1", 0, 0), HOSTILE_OUTPUT)
    st.write_bytes(log_chunk_path("sim-1", 0, 1), SECOND_CHUNK)
    return url


def _controls(out: bytes) -> list[str]:
    """Every control character in ``out`` that is not newline, tab or part of an SGR."""
    import re

    text = re.sub(r"\x1b\[[0-9;:]*m", "", out.decode("utf-8"))
    return [c for c in text if (ord(c) < 0x20 and c not in "\n\t") or 0x7f <= ord(c) <= 0x9f
            or 0x202a <= ord(c) <= 0x202e or 0x2066 <= ord(c) <= 0x2069]


def test_logs_escapes_control_sequences_and_keeps_colour(tmp_path, capsysbinary) -> None:
    from spotrun.cli import main

    url = _hostile_run(tmp_path)
    assert main(["logs", url]) == 0
    out = capsysbinary.readouterr().out
    assert _controls(out) == [], out
    text = out.decode()
    # What was there stays readable, escaped.
    assert "\\x1b]52;c;Y3VybCBldmlsIHwgc2g=" in text and "\\x1b[6n" in text and "\\u202e" in text
    # Colour, tab and lines are kept; the colour split across chunks is whole; a reset ends it.
    assert "\x1b[1;32mgreen\x1b[0m\tok\n" in text
    assert "progress 50%\nprogress 100%\x1b[31mred\n" in text
    assert text.endswith("\x1b[0m")


def test_logs_raw_writes_the_shipped_bytes(tmp_path, capsysbinary) -> None:
    from spotrun.cli import main

    url = _hostile_run(tmp_path)
    assert main(["logs", url, "--raw"]) == 0
    assert capsysbinary.readouterr().out == HOSTILE_OUTPUT + SECOND_CHUNK


def test_sanitizer_holds_a_character_split_across_chunks() -> None:
    from spotrun.cli.terminal import TerminalSanitizer

    s = TerminalSanitizer()
    out = b"".join([s.feed(b"caf\xc3"), s.feed(b"\xa9 \xe2\x80"), s.feed(b"\xae!\r"), s.feed(b"\nend"), s.close()])
    assert out.decode() == "café \\u202e!\nend"


# -- issue 20 / issue 23 item 2: reports of nothing are refused in one line, exit 2 ----------


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("spotrun: error: "), err
    return err[0]


def _main_code(argv: list[str]) -> int:
    from spotrun.cli import main

    try:
        return main(argv)
    except SystemExit as exc:  # argparse's refusal of a flag's value
        return int(exc.code)


@pytest.mark.parametrize("command", [["cost", "--offline"], ["status", "--no-aws"], ["verify"]])
def test_cost_and_status_refuse_a_folder_that_holds_no_run(tmp_path, capsys, command) -> None:
    (tmp_path / "notes.txt").write_text("not a run")
    (tmp_path / "data").mkdir()
    assert _main_code([command[0], str(tmp_path), *command[1:]]) == 2
    line = _one_error_line(capsys)
    assert f"no run at {tmp_path}" in line and "data, notes.txt" in line, line


def test_status_and_cost_still_report_a_checkpoint_only_run(tmp_path, capsys) -> None:
    import torch

    from spotrun.checkpoint import Checkpointer

    with Checkpointer(str(tmp_path / "run"), model=torch.nn.Linear(2, 1), every_steps=1,
                      async_save=False, handle_signals=False, watchers=[]) as ck:
        ck.step()
    assert _main_code(["status", str(tmp_path / "run"), "--no-aws"]) == 0
    assert "checkpoint" in capsys.readouterr().out
    assert _main_code(["verify", str(tmp_path / "run")]) == 0
    assert "1 of 1 committed checkpoints intact" in capsys.readouterr().out


@pytest.mark.parametrize("args, words", [
    (["cost", "RUN", "--spot-price", "inf"], "--spot-price=inf is not a finite number"),
    (["cost", "RUN", "--on-demand-price", "nan"], "--on-demand-price=nan is not a finite number"),
    (["cost", "RUN", "--spot-price", "0"], "--spot-price=0 must be > 0"),
    (["estimate", "g5.xlarge", "--offline", "--hours", "0"], "--hours=0 must be > 0"),
    (["estimate", "g5.xlarge", "--offline", "--hours", "5", "--runs", "0"], "--runs=0 must be > 0"),
    (["estimate", "g5.xlarge", "--offline", "--hours", "5", "--on-demand-price", "0"], "--on-demand-price=0"),
    (["estimate", "g5.xlarge", "--offline", "--hours", "5", "--spot-price", "-1"], "--spot-price=-1"),
    (["estimate", "g5.xlarge", "--offline", "--hours", "5", "--checkpoint-save", "soon"],
     "--checkpoint-save='soon' is not a duration"),
    (["estimate", "g5.xlarge", "--offline", "--hours", "5", "--checkpoint-interval", "0"],
     "--checkpoint-interval=0 must be > 0"),
    (["estimate", "g5.xlarge", "--offline", "--hours", "5", "--interruption-rate", "7%"], "0% or one of"),
])
def test_reports_of_nothing_and_infinite_prices_are_one_line_exit_2(tmp_path, capsys, args, words) -> None:
    argv = [str(tmp_path) if a == "RUN" else a for a in args]
    assert _main_code(argv) == 2
    assert words in _one_error_line(capsys)


def test_config_file_prices_go_through_the_same_check(tmp_path, capsys) -> None:
    cfg = tmp_path / "prices.toml"
    cfg.write_text("[prices]\nspot = inf\n")
    assert _main_code(["estimate", "g5.xlarge", "--offline", "--hours", "5", "--config", str(cfg)]) == 2
    assert "[prices] spot=inf is not a finite number" in _one_error_line(capsys)


def test_estimate_accepts_zero_percent_as_never_interrupted(capsys) -> None:
    import json

    from spotrun.cli import main

    assert main(["estimate", "g5.xlarge", "--offline", "--hours", "10", "--interruption-rate", "0%",
                 "--checkpoint-save", "60", "--restart", "5m", "--spot-price", "0.3",
                 "--on-demand-price", "1.0", "--json"]) == 0
    e = json.loads(capsys.readouterr().out)
    assert e["rate_per_hour"] == 0 and e["mtbi_hours"] is None
    at = e["at_interval"]
    assert at["interruptions"] == 0 and at["rework_s"] == 0 and at["restart_s"] == 0
    # Nothing interrupts it: one checkpoint per run, so the only overhead is one save.
    assert e["checkpoint_interval_s"] == 36000 and at["wall_s"] == pytest.approx(36000 + 60)
    assert e["spot_cost_per_run"] == pytest.approx((36060 / 3600) * 0.3)
    assert main(["estimate", "g5.xlarge", "--offline", "--hours", "10", "--interruption-rate", "0%"]) == 0
    assert "never interrupted: no re-work, no restarts" in capsys.readouterr().out


# -- issue 23 item 4: the snapshot's spot estimate is explained in the project's own words ---


def test_price_sources_say_what_the_70_percent_is(capsys) -> None:
    from spotrun.cli import main

    assert main(["estimate", "g5.xlarge", "--hours", "1", "--offline"]) == 0
    out = capsys.readouterr().out
    assert "an assumed 70% spot discount used when no market price is known" in out
    assert "course" not in out


# -- issue 23 item 6: --help texts read as sentences -------------------------------------------


def test_offline_help_says_where_prices_come_from(capsys) -> None:
    from spotrun.cli import main

    for command in ("cost", "estimate"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        help_text = " ".join(capsys.readouterr().out.split())
        assert "the disk cache's nothing" not in help_text
        assert "never call an AWS API or read its disk cache" in help_text, help_text


def test_check_resume_help_documents_every_option(capsys) -> None:
    from spotrun.cli import main

    with pytest.raises(SystemExit):
        main(["check-resume", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--interruptions K, -k K how many times" in help_text
    assert "--keep keep the temporary folder" in help_text and "removed on PASS" in help_text


# -- one check per kind of value: portfolio tables and the remaining flags -----------------


@pytest.mark.parametrize("toml, words", [
    ("[[training]]\nname='a'\ninstance_type='g5.xlarge'\nhours_per_run=nan\nruns_per_month=1\n",
     "hours_per_run=nan is not a finite number"),
    ("[[training]]\nname='a'\ninstance_type='g5.xlarge'\nhours_per_run=0\nruns_per_month=1\n",
     "hours_per_run=0 must be > 0"),
    ("[[training]]\nname='a'\ninstance_type='g5.xlarge'\nhours_per_run=1\nruns_per_month=inf\n",
     "runs_per_month=inf is not a finite number"),
    ("[prices]\n'g5.xlarge'='cheap'\n[[training]]\nname='a'\ninstance_type='g5.xlarge'\nhours_per_run=1\n"
     "runs_per_month=1\nmarket='on-demand'\n", "[prices] g5.xlarge='cheap' is not a price"),
])
def test_portfolio_numbers_go_through_the_shared_checks(tmp_path, capsys, toml, words) -> None:
    f = tmp_path / "p.toml"
    f.write_text(toml)
    assert _main_code(["estimate", "--portfolio", str(f), "--offline"]) == 2
    assert words in _one_error_line(capsys)


@pytest.mark.parametrize("value", ["nan", "0", "-1", "inf"])
def test_logs_interval_is_a_duration(tmp_path, capsys, value) -> None:
    assert _main_code(["logs", str(tmp_path), "--follow", "--interval", value]) == 2
    assert "--interval" in _one_error_line(capsys)
