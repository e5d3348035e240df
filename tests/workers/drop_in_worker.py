"""Run by test_distributed.py under torchrun (2 gloo processes), once per side: the seeds' Trainer subclasses
(helpers.seeds) with `transformers.Trainer` or `loop.Trainer` as their base, only the base differing. Rank 0 dumps
each subclass's log_history and its callback's numbers."""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/: helpers

import transformers  # noqa: E402
from helpers import (  # noqa: E402
    ClsData,
    LossLoggingCallback,
    SimpleClassifier,
    cross_entropy_over_items,
    seeds,
    worker_args,
)

import loop  # noqa: E402

out, side = sys.argv[1], sys.argv[2]
Base = transformers.Trainer if side == "trainer" else loop.Trainer
CustomTrainer, _, CustomOptimizerTrainer, _ = seeds(Base)
result = {}
# accelerator_config: each global batch of 4 split over the ranks, uneven last batches allowed, gradients reduced
# after every micro-batch
split = {"split_batches": True, "even_batches": False, "gradient_accumulation_kwargs": {"sync_each_batch": True}}
for name, cls, hooks, kw in (
    ("compute_loss", CustomTrainer, {}, {}),
    ("create_optimizer", CustomOptimizerTrainer, {"compute_loss_func": cross_entropy_over_items}, {}),
    (
        "accelerator_config",
        CustomTrainer,
        {},
        {"accelerator_config": split, "per_device_train_batch_size": 4, "per_device_eval_batch_size": 4},
    ),
):
    args = worker_args(os.path.join(out, side, name), seed=5, **kw)
    callback = LossLoggingCallback()
    trainer = cls(
        model=SimpleClassifier(),
        args=args,
        train_dataset=ClsData(40),
        eval_dataset=ClsData(11, seed=1),
        callbacks=[callback],
        **hooks,
    )
    trainer.train()
    result[name] = {"log": trainer.state.log_history, "losses": callback.losses}
if int(os.environ.get("RANK", "0")) == 0:
    with open(os.path.join(out, f"{side}.json"), "w") as f:
        json.dump(result, f)
from loop.cli import leave_process_group  # noqa: E402

leave_process_group(0)  # a clean exit under torchrun (see loop/cli.py)
