"""Hostile and careless input at the CLI surface (issue 20, issue 23): each case is one line
and the right exit code, and nothing the CLI prints can harm the user's terminal."""

from __future__ import annotations

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
    from spotrun.checkpoint import Checkpointer
    from spotrun.cli import main

    import torch

    model = torch.nn.Linear(2, 1)
    with Checkpointer(str(tmp_path / "run"), model=model, every_steps=1, async_save=False,
                      handle_signals=False, watchers=[]) as ck:
        ck.step()
    assert main(["ls", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert " B  committed" in out or "KiB  committed" in out, out
    assert "0.0" not in out


# -- issue 20: no SDK chatter before a one-line error at the default verbosity -------------


def _spotrun(env: dict, *args: str) -> "subprocess.CompletedProcess[str]":
    import subprocess
    import sys

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
