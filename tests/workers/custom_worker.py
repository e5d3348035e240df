"""Run by test_distributed.py under torchrun (2 gloo processes), once per side: `trainer` trains with Trainer, `loop`
with the loop (compute_loss_func on a logits-only model, gradient accumulation 2) and then predicts 11 samples.
Rank 0 dumps the log (each side in its own launch: both set up the process-wide accelerate state)."""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/: helpers

import torch  # noqa: E402
from helpers import ClsData, SimpleClassifier, cross_entropy_over_items, worker_args  # noqa: E402
from transformers import Trainer  # noqa: E402

import loop  # noqa: E402

out, side = sys.argv[1], sys.argv[2]
args = worker_args(os.path.join(out, "trainer"))
train, val = ClsData(40), ClsData(11, seed=1)
result = {"world_size": None}
if side == "trainer":
    trainer = Trainer(
        model=SimpleClassifier(),
        args=args,
        train_dataset=train,
        eval_dataset=val,
        compute_loss_func=cross_entropy_over_items,
    )
    trainer.train()
    result.update(log=trainer.state.log_history, world_size=args.world_size)
else:
    config = loop.TrainConfig.from_training_arguments(args, output_dir=os.path.join(out, "loop"))
    run = loop.train(config, SimpleClassifier(), train, eval_dataset=val, compute_loss_func=cross_entropy_over_items)
    pred = loop.predict(config, SimpleClassifier(seed=3), val, compute_loss_func=cross_entropy_over_items)
    result.update(
        log=run.log_history,
        predictions=pred.predictions.tolist(),
        label_ids=pred.label_ids.tolist(),
        world_size=torch.distributed.get_world_size(),
    )
if int(os.environ.get("RANK", "0")) == 0:
    with open(os.path.join(out, f"{side}.json"), "w") as f:
        json.dump(result, f)
from loop.cli import leave_process_group  # noqa: E402

leave_process_group(0)  # a clean exit under torchrun (see loop/cli.py)
