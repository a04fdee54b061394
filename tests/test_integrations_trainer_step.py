"""A trainer checkpoint folder whose files were copied from another checkpoint, with its
manifest re-hashed, passes every checksum; the trainer's own step tells them apart. The
README counts "a step that does not match its folder" as damage: the folder is moved aside
and the one before it is used (issue 20).

In-process, tiny models on CPU, local run URLs.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from helpers import committed_steps, tiny_hf_trainer

from spotrun.format.commit import commit, list_damaged, read_manifest
from spotrun.format.manifest import Manifest
from spotrun.records.layout import checkpoint_dir
from spotrun.storage import Storage


def copy_over_and_rehash(url: str, source: int, target: int) -> None:
    """Put checkpoint ``source``'s files in ``target``'s folder and write a manifest that
    matches them (what a careless sync or a hand repair leaves): every checksum passes."""
    storage = Storage(url)
    src, dst = Path(url) / checkpoint_dir(source), Path(url) / checkpoint_dir(target)
    old = read_manifest(storage, target)
    for name in read_manifest(storage, source).files:
        (dst / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src / name, dst / name)
    files = {name: storage.write_bytes(f"{checkpoint_dir(target)}/{name}", (dst / name).read_bytes())
             for name in read_manifest(storage, source).files}
    commit(storage, Manifest(step=target, files=files, world_size=old.world_size))


def test_hf_folder_holding_another_steps_trainer_state_is_damage(tmp_path):
    from spotrun.integrations.hf import SpotrunCallback, train

    url = str(tmp_path / "run")
    train(tiny_hf_trainer(str(tmp_path / "a"), 4, SpotrunCallback(url, handle_signals=False, watchers=[])))
    assert committed_steps(url) == [2, 4]
    copy_over_and_rehash(url, source=2, target=4)

    again = SpotrunCallback(url, handle_signals=False, watchers=[])
    trainer = tiny_hf_trainer(str(tmp_path / "b"), 6, again)
    path = again.resume_path(trainer)
    # Not "resuming from step 4" with step 2's state: step 4 is moved aside, 2 is used.
    assert path == str(Path(url) / checkpoint_dir(2))
    (moved,) = list_damaged(Storage(url))
    note = (Path(url) / "damaged" / moved / "damaged.json").read_text()
    assert "global_step=2" in note and "step 4" in note
    trainer.train(resume_from_checkpoint=path)
    assert trainer.state.global_step == 6
    assert committed_steps(url) == [4, 6]


def _accelerate_loop(url: str, staging: str, steps: int, every: int):
    import torch
    from accelerate import Accelerator

    from spotrun.integrations.accelerate import SpotrunAccelerate

    torch.manual_seed(0)
    accelerator = Accelerator(cpu=True)
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model, opt = accelerator.prepare(model, opt)
    spot = SpotrunAccelerate(accelerator, url, every_steps=every, staging_dir=staging,
                             keep_last=3, handle_signals=False, watchers=[])
    return spot, model, opt


def test_accelerate_folder_holding_another_steps_files_is_damage(tmp_path):
    import torch

    url = str(tmp_path / "run")
    spot, model, opt = _accelerate_loop(url, str(tmp_path / "s1"), 4, 2)
    for _ in spot.range(4):
        opt.zero_grad()
        model(torch.ones(3, 4)).sum().backward()
        opt.step()
    assert committed_steps(url) == [2, 4]
    copy_over_and_rehash(url, source=2, target=4)

    spot, model, opt = _accelerate_loop(url, str(tmp_path / "s2"), 6, 2)
    assert spot.restore() == 2
    (moved,) = list_damaged(Storage(url))
    assert "global_step=2" in (Path(url) / "damaged" / moved / "damaged.json").read_text()
    spot.close()


def test_step_file_check_passes_a_match_and_a_missing_file(tmp_path):
    from spotrun.integrations.folders import trainer_json_step_problem

    f = tmp_path / "trainer_state.json"
    f.write_text('{"global_step": 7}')
    assert trainer_json_step_problem(str(f), 7) is None
    assert "global_step=7" in trainer_json_step_problem(str(f), 8)
    assert trainer_json_step_problem(str(tmp_path / "absent.json"), 8) is None
