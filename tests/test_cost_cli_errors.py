"""Issue 13 items 5 and 12: one clear line and exit 2, never a traceback or an empty report."""

from __future__ import annotations

import pytest

from spotrun.cli import main


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("spotrun: error: "), err
    return err[0]


@pytest.mark.parametrize("args, words", [
    (["--hours", "nan"], "--hours=nan"),
    (["--hours", "inf"], "--hours=inf"),
    (["--hours", "1e308"], "--hours"),
    (["--hours", "10", "--runs", "nan"], "--runs=nan"),
    (["--hours", "10", "--region", "mars-1"], "'mars-1' is not an AWS region"),
])
def test_estimate_refuses_non_numbers_and_unknown_regions(args, words, capsys):
    assert main(["estimate", "g5.xlarge", "--offline", *args]) == 2
    assert words in _one_line_error(capsys)


@pytest.mark.parametrize("command", [["cost", "--offline"], ["status", "--no-aws"]])
def test_cost_and_status_on_a_run_that_does_not_exist(tmp_path, capsys, command):
    for url in (tmp_path / "no-such-run", tmp_path):  # absent, and present but empty
        assert main([command[0], str(url), *command[1:]]) == 2
        line = _one_line_error(capsys)
        assert f"no run at {url}" in line and "check the run URL" in line
