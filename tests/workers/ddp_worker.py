"""Run by test_distributed.py, under torchrun (2 processes) or alone: train the tiny GPT-2, dump log_history."""

import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/: helpers

from helpers import LMData, tiny_gpt2  # noqa: E402

import loop  # noqa: E402

out, batch = sys.argv[1], int(sys.argv[2])
extra = dict(a.split("=", 1) for a in sys.argv[3:])
vocab = int(extra.pop("vocab", 64))  # a larger vocabulary makes the model span several 1 MB DDP buckets
model_name = extra.pop("model", "gpt2")  # bn: a regressor with BatchNorm, whose running statistics are buffers
config = loop.TrainConfig(
    output_dir=os.path.join(out, "run"),
    per_device_train_batch_size=batch,
    gradient_accumulation_steps=2,
    max_steps=6,
    logging_steps=1,
    learning_rate=1e-3,
    save_strategy="no",
    use_cpu=True,
    disable_tqdm=True,
    telemetry=False,
    eval_strategy="steps",
    eval_steps=3,
    per_device_eval_batch_size=3,
    **extra,
)


class SeenDuringTheRun(loop.Callback):
    """torch's process-wide optimize_ddp as the run's steps see it (ddp_compile_overlap sets it for the run only)."""

    optimize_ddp = None

    def on_step_end(self, run):
        import torch._dynamo

        SeenDuringTheRun.optimize_ddp = torch._dynamo.config.optimize_ddp


class BatchNormRegressor(torch.nn.Module):
    """Its BatchNorm's running statistics are buffers the forward changes: DDP broadcasts them from rank 0."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(
            torch.nn.Linear(8, 16), torch.nn.BatchNorm1d(16), torch.nn.ReLU(), torch.nn.Linear(16, 1)
        )

    def forward(self, x, labels=None):
        y = self.net(x).squeeze(-1)
        return {"loss": torch.nn.functional.mse_loss(y, labels), "logits": y}


def rows(n, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g) * torch.linspace(0.5, 3, 8) + torch.arange(8.0)
    return [{"x": x[i], "labels": float(x[i].sum() / 8)} for i in range(n)]


model, train, evaluation = (
    (BatchNormRegressor(), rows(48, 0), rows(12, 1))
    if model_name == "bn"
    else (tiny_gpt2(vocab=vocab), LMData(48, ragged=True), LMData(12, seed=1, ragged=True))
)
result = loop.train(config, model, train, eval_dataset=evaluation, callbacks=[SeenDuringTheRun()])
if int(os.environ.get("RANK", "0")) == 0:
    with open(os.path.join(out, "log.json"), "w") as f:
        json.dump(result.log_history, f)
    if config.torch_compile:  # how dynamo compiled the model: one AOT graph per piece it was split into
        import torch._dynamo

        with open(os.path.join(out, "compiled.json"), "w") as f:
            json.dump(
                {
                    "optimize_ddp": SeenDuringTheRun.optimize_ddp,
                    "optimize_ddp_after": torch._dynamo.config.optimize_ddp,
                    "aot_graphs": torch._dynamo.utils.counters["aot_autograd"]["total"],
                },
                f,
            )
from loop.cli import leave_process_group  # noqa: E402

leave_process_group(0)  # a clean exit under torchrun (see loop/cli.py)
