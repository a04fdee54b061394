"""Issue 23 item 8: check-resume's temporary working folder (every checkpoint of two runs) is
removed on PASS unless --keep, kept and named on FAIL or an error; a --workdir is never
removed. Real runs of the prefetch example (as in tests/test_resume.py)."""

from __future__ import annotations

import sys
import tempfile

import pytest
from helpers import REPO, env_for

from spotrun.cli import main
from spotrun.proof.resume_check import check_resume

PREFETCH = str(REPO / "tests" / "scripts" / "prefetch_train.py")


def _cmd(warm_exec, *extra: str) -> list[str]:
    # Each start a warm fork (``warm_exec``): a real process, without a torch import.
    return warm_exec.command(PREFETCH, "--steps", "40", "--every-steps", "5", "--step-sleep", "0.05", *extra)


@pytest.fixture()
def tmp_root(tmp_path, monkeypatch, warm_exec):
    """Where mkdtemp puts the working folder, so the test sees what is left there; the
    environment a ``warm_exec`` client needs."""
    root = tmp_path / "tmp"
    root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(root))
    for k, v in {**env_for(""), **warm_exec.at_start}.items():
        monkeypatch.setenv(k, v)
    return root


@pytest.mark.slow
def test_pass_removes_the_temporary_folder_and_says_so(tmp_root, capsys, warm_exec) -> None:
    """Also the fixed prefetch port's PASS (was test_resume.py's
    test_check_resume_passes_the_fixed_prefetch_port, the same command: folded here to start
    it once): the prefetched batch saved through values= resumes exactly. The script seeds
    torch only: its Python and NumPy RNGs start differently in every process but are never
    drawn from, which is no difference (issue 11 item 4)."""
    assert main(["check-resume", "-k", "2", "--seed", "2", "--", *_cmd(warm_exec, "--fixed")]) == 0
    out = capsys.readouterr().out
    assert "PASS" in out and "removed the working folder" in out, out
    assert list(tmp_root.iterdir()) == []
    assert "2 of 2 interruptions delivered" in out, out
    ignored = " ".join(ln for ln in out.splitlines() if "ignored (never drawn from in either run):" in ln)
    assert "rank-00000.rng.python" in ignored and "rank-00000.rng.numpy" in ignored, out


@pytest.mark.slow
def test_keep_and_fail_keep_the_folder_and_name_it(tmp_root, warm_exec) -> None:
    kept = check_resume(_cmd(warm_exec, "--fixed"), interruptions=1, seed=2, env=env_for(""), timeout=300,
                        keep=True)
    assert kept.passed and kept.kept
    failed = check_resume(_cmd(warm_exec, "--fixed", "--numpy-draw"), interruptions=1, seed=2, env=env_for(""),
                          timeout=300)
    assert failed.verdict == "FAIL" and failed.kept
    # What the FAIL names (was test_resume.py's
    # test_check_resume_fails_on_an_unseeded_rng_that_is_drawn_from, the same run: folded
    # here): an unseeded RNG that is drawn from differs, one never drawn from does not.
    assert not failed.passed, failed.to_dict()
    assert any(d.startswith("rank-00000.rng.numpy") for d in failed.differences), failed.differences
    assert not any("rng.python" in d for d in failed.differences)  # never drawn from
    assert failed.divergence is not None
    assert failed.divergence.entries[0].startswith("rank-00000.rng.numpy")
    assert "before any resume" in failed.divergence.cause, failed.divergence.cause
    left = sorted(p.name for p in tmp_root.iterdir())
    assert len(left) == 2 and all(n.startswith("spotrun-check-resume-") for n in left)
    for r in (kept, failed):
        for d in r.run_dirs:
            assert (tmp_root / d).exists()


def test_an_error_keeps_the_folder_and_the_message_names_it(tmp_root, capsys) -> None:
    code = main(["check-resume", "-k", "1", "--", sys.executable, "-c", "raise SystemExit(1)"])
    err = capsys.readouterr().err
    (left,) = list(tmp_root.iterdir())
    assert code != 0 and f"both runs are kept in {left}" in err, err
    assert len(err.strip().splitlines()) == 1, err


def test_workdir_is_never_removed(tmp_path, tmp_root, capsys) -> None:
    work = tmp_path / "mine"
    script = "import os; os.makedirs(os.environ['SPOTRUN_URL']); raise SystemExit(1)"
    main(["check-resume", "-k", "1", "--workdir", str(work), "--", sys.executable, "-c", script])
    assert str(work) not in capsys.readouterr().err  # the caller's folder: no "kept in" note
    assert (work / "uninterrupted").exists() and list(tmp_root.iterdir()) == []
