"""A Hugging Face Trainer run under spotrun: a tiny GPT-2 (built from a config, no download)
on random tokens, on CPU.

    SPOTRUN_URL=runs/hf python examples/hf_train.py            # or s3://bucket/prefix
    spotrun launch --local --interruptions 3 -- python examples/hf_train.py
    spotrun check-resume -- python examples/hf_train.py

The one spotrun line is ``spot_hf.train(trainer)`` (instead of ``trainer.train()``): it
resumes from the newest valid checkpoint, commits every checkpoint the Trainer saves, and on
SIGTERM / a spot notice saves at the current step, commits and exits 75.

One line transformers prints on every resume is expected: "There were missing keys in the
checkpoint model loaded: ['lm_head.weight']". GPT-2's output layer shares its weights with the
token embedding, so ``model.safetensors`` stores them once and the Trainer's loader reports
the other name as missing; the shared tensor is loaded, and the resumed run matches an
uninterrupted one bit for bit (tests/test_integrations_hf.py). So is "`loss_type=None` was
set in the config but it is unrecognized. Using the default loss: `ForCausalLMLoss`", once per
process: transformers' own notice for models built from a config; naming the loss on the
model changes how the Trainer scales and reports it, so the example leaves it alone.
"""

from __future__ import annotations

import argparse
import logging
import os
import time

import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)
from transformers.utils import logging as hf_logging

import spotrun.integrations.hf as spot_hf


class _Tokens(torch.utils.data.Dataset):
    def __init__(self, n: int, length: int, vocab: int) -> None:
        g = torch.Generator().manual_seed(1234)
        self.ids = torch.randint(0, vocab, (n, length), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class _Slow(TrainerCallback):
    """Stretches each step (tests and demos need time to interrupt a tiny model)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def on_step_end(self, args, state, control, **kwargs):
        time.sleep(self.seconds)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--save-steps", type=int, default=20)
    p.add_argument("--step-sleep", type=float, default=0.0)
    p.add_argument("--output-dir", default=None,
                   help="the Trainer's own folder (staging); default: RUN_URL/trainer for a local run")
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("transformers").setLevel(logging.WARNING)
    # transformers draws a "Writing model shards" bar on every save (disable_tqdm covers
    # only the Trainer's own bars); spotrun logs each commit with its size and time instead.
    hf_logging.disable_progress_bar()

    url = os.environ.get("SPOTRUN_URL", "runs/hf")
    local = "://" not in url or url.startswith("file://")
    output_dir = a.output_dir or (os.path.join(url.removeprefix("file://"), "trainer") if local else "hf_output")

    set_seed(0)
    # GPT-2's default bos/eos token ids (50256) lie outside this tiny vocabulary: name one inside.
    config = GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=2,
                        bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(config)  # dropout on (0.1): exact resume needs the RNG restored
    args = TrainingArguments(
        output_dir=output_dir, max_steps=a.steps, save_strategy="steps", save_steps=a.save_steps,
        per_device_train_batch_size=8, learning_rate=1e-3, lr_scheduler_type="cosine",
        warmup_steps=5, seed=0, use_cpu=True, report_to=[], disable_tqdm=True,
        logging_strategy="no", dataloader_num_workers=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=_Tokens(96, 16, 64),
                      callbacks=[_Slow(a.step_sleep)] if a.step_sleep else None)
    spot_hf.train(trainer, url=url)


if __name__ == "__main__":
    main()
