"""Checkpoints both Trainers read (loop/trainer_format.py): Trainer resumes from the loop's checkpoint, and the loop
from Trainer's, and in both directions the continued run logs what Trainer logs when it resumes its own checkpoint
(CPU, fp32: to the bit). Dropout on, accumulation 2, the resume in the middle of an epoch, evaluation and a log window
that straddles the resume."""

import json
import os
import shutil

import pytest
import torch
import transformers
from helpers import LMData, assert_same, clone, tiny_gpt2
from transformers import EarlyStoppingCallback, TrainingArguments

import loop
from loop import checkpoint as ckpt


def _args(out, **kw):
    base = dict(
        output_dir=str(out),
        per_device_train_batch_size=4,
        per_device_eval_batch_size=5,
        gradient_accumulation_steps=2,
        learning_rate=1e-2,
        max_steps=10,  # 5 optimizer steps an epoch: checkpoint-4 is inside the first
        logging_steps=3,  # the record at step 6 averages steps 5-6 after a resume at 4 (Trainer's rule)
        eval_strategy="steps",
        eval_steps=4,
        save_strategy="steps",
        save_steps=4,
        metric_for_best_model="eval_loss",
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
        seed=7,
    )
    return TrainingArguments(**{**base, **kw})


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Each Trainer's uninterrupted run with its checkpoints, and Trainer's own resume from its checkpoint-4."""
    root = tmp_path_factory.mktemp("interop")
    model, train, evals = tiny_gpt2(dropout=0.1), LMData(40), LMData(9, seed=1)

    def run(Base, name, resume=None, source=None):
        out = root / name
        if source is not None:  # the checkpoint the other Trainer wrote, alone in a fresh output_dir
            shutil.copytree(source, out / os.path.basename(source))
        trainer = Base(
            model=clone(model),
            args=_args(out),
            train_dataset=train,
            eval_dataset=evals,
            callbacks=[EarlyStoppingCallback(early_stopping_patience=5)],  # stateful: its counter is checkpointed
        )
        output = trainer.train(resume_from_checkpoint=resume)
        return trainer, output

    runs = {"trainer": run(transformers.Trainer, "trainer"), "loop": run(loop.Trainer, "loop")}
    runs["trainer from trainer"] = run(
        transformers.Trainer, "tt", str(root / "tt" / "checkpoint-4"), root / "trainer" / "checkpoint-4"
    )
    runs["root"], runs["run"] = root, run
    return runs


def test_the_loops_checkpoint_holds_trainers_files(runs):
    folder = runs["root"] / "loop" / "checkpoint-4"
    files = set(os.listdir(folder))
    assert {"trainer_state.json", "training_args.bin", "rng_state.pth", "optimizer.pt", "scheduler.pt"} <= files
    assert {"model.safetensors", "config.json", "loop_state.json", "COMPLETE"} <= files
    marker = json.loads((folder / "COMPLETE").read_text())
    assert "trainer_state.json" in marker["files"] and "training_args.bin" in marker["files"]  # in the manifest
    theirs = json.loads((runs["root"] / "trainer" / "checkpoint-4" / "trainer_state.json").read_text())
    ours = json.loads((folder / "trainer_state.json").read_text())
    assert ours.keys() == theirs.keys()
    for key in ("global_step", "epoch", "max_steps", "logging_steps", "eval_steps", "save_steps", "train_batch_size"):
        assert ours[key] == theirs[key], key
    assert ours["stateful_callbacks"] == theirs["stateful_callbacks"]  # EarlyStoppingCallback and TrainerControl
    assert ours["best_metric"] == theirs["best_metric"] and ours["best_global_step"] == theirs["best_global_step"]
    assert_same(theirs["log_history"], ours["log_history"])
    args = torch.load(folder / "training_args.bin", weights_only=False)
    assert isinstance(args, TrainingArguments) and args.gradient_accumulation_steps == 2


@pytest.mark.parametrize("direction", ["loop from trainer", "trainer from loop"])
def test_a_resume_across_trainers_logs_what_trainer_logs_resuming_its_own(runs, direction):
    writer, Reader = ("trainer", loop.Trainer) if direction == "loop from trainer" else ("loop", transformers.Trainer)
    name = direction.replace(" ", "-")
    source = runs["root"] / writer / "checkpoint-4"
    reader, output = runs["run"](Reader, name, str(runs["root"] / name / "checkpoint-4"), source)
    expected, expected_out = runs["trainer from trainer"]
    assert_same(expected.state.log_history, reader.state.log_history)
    assert output.global_step == expected_out.global_step == 10
    assert output.training_loss == expected_out.training_loss
    # and the weights it ends with are Trainer's, to the bit
    theirs, ours = expected.model.state_dict(), reader.model.state_dict()
    assert all(torch.equal(theirs[k], ours[k]) for k in theirs)


def test_the_loop_resumes_trainers_latest_checkpoint(runs, tmp_path):
    """`resume_from_checkpoint=True` in an output_dir Trainer wrote: its newest checkpoint, Trainer's way."""
    shutil.copytree(runs["root"] / "trainer", tmp_path / "out")
    assert [s for s, _ in ckpt.list_checkpoints(str(tmp_path / "out"))] == [4, 8, 10]
    shutil.rmtree(tmp_path / "out" / "checkpoint-10")
    (tmp_path / "out" / "checkpoint-8" / "trainer_state.json").write_text("{half")  # killed while writing it
    with pytest.warns(UserWarning, match="checkpoint-8: its trainer_state.json is unreadable"):
        path = ckpt.resolve_resume(True, str(tmp_path / "out"))
    assert path.endswith("checkpoint-4")
