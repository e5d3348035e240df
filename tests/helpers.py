"""Tiny models and data made on the spot (no downloads), and the assertions several test modules share."""

import copy
import os
import subprocess
import sys

import torch
from torch import nn


def tiny_gpt2(seed=0, dropout=0.0, vocab=64):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    return GPT2LMHeadModel(
        GPT2Config(
            vocab_size=vocab,
            n_positions=32,
            n_embd=32,
            n_layer=2,
            n_head=2,
            resid_pdrop=dropout,
            embd_pdrop=dropout,
            attn_pdrop=dropout,
        )
    )


def tiny_bert_classifier(seed=0, dropout=0.1, num_labels=3):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    return BertForSequenceClassification(
        BertConfig(
            vocab_size=50,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=32,
            num_labels=num_labels,
            hidden_dropout_prob=dropout,
            attention_probs_dropout_prob=dropout,
        )
    )


class LMData(torch.utils.data.Dataset):
    """Random token rows; `ragged` adds -100 padding of varying length so item counts differ per batch."""

    def __init__(self, n, length=16, seed=0, vocab=64, ragged=False):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randint(0, vocab, (n, length), generator=g)
        self.labels = self.x.clone()
        if ragged:
            cut = torch.randint(2, length, (n,), generator=g)
            for i, c in enumerate(cut):
                self.labels[i, c:] = -100

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"input_ids": self.x[i], "labels": self.labels[i]}


class ClsData(torch.utils.data.Dataset):
    def __init__(self, n, length=12, seed=0, vocab=50, num_labels=3):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randint(1, vocab, (n, length), generator=g)
        self.y = torch.randint(0, num_labels, (n,), generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"input_ids": self.x[i], "attention_mask": torch.ones_like(self.x[i]), "labels": self.y[i]}


class PlainRegressor(nn.Module):
    """A plain nn.Module returning (loss, prediction), as Trainer accepts."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(4, 16), nn.LayerNorm(16), nn.ReLU(), nn.Linear(16, 1))

    def forward(self, x, labels=None):
        y = self.net(x).squeeze(-1)
        return (nn.functional.mse_loss(y, labels), y) if labels is not None else (y,)


class RegData(torch.utils.data.Dataset):
    def __init__(self, n, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 4, generator=g)
        self.y = self.x @ torch.tensor([1.0, -2.0, 0.5, 3.0]) + 0.1 * torch.randn(n, generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "labels": self.y[i]}


class PackedLM(torch.utils.data.Dataset):
    """Packed rows as tasks.causal_lm.pack builds them: documents of 1 to 23 tokens, positions restarting at 0."""

    def __init__(self, n_docs, block=16, seed=0, vocab=64):
        from loop.tasks.causal_lm import pack

        g = torch.Generator().manual_seed(seed)
        docs = [
            torch.randint(0, vocab, (int(torch.randint(1, 24, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n_docs)
        ]
        self.rows = pack(docs, block, pad_id=0)

    def __len__(self):
        return len(self.rows["input_ids"])

    def __getitem__(self, i):
        return {k: torch.tensor(v[i]) for k, v in self.rows.items()}


_TENSORS = {"_parameters", "_buffers", "_modules", "_non_persistent_buffers_set"}


def fingerprint(model):
    """Everything but the tensors: each module's attributes (by identity or value), its hooks, its config."""
    out = []
    for name, module in model.named_modules():
        attrs = {
            k: (v if isinstance(v, (bool, int, float, str, type(None))) else id(v))
            for k, v in vars(module).items()
            if k not in _TENSORS
        }
        hooks = {k: sorted(v) for k, v in vars(module).items() if "hook" in k and isinstance(v, dict)}
        out.append((name, type(module).__name__, attrs, hooks))
    config = getattr(model, "config", None)
    return out, (config.to_dict() if config is not None else None, getattr(config, "_attn_implementation", None))


def clone(model):
    return copy.deepcopy(model)


def comparable(record):
    """A log record without wall-clock values and loop-only keys."""
    return {
        k: v for k, v in record.items() if not k.endswith(("_runtime", "_per_second")) and not k.startswith("loop/")
    }


class SimpleClassifier(nn.Module):
    """Returns logits only, no loss (a research model trained with a custom loss). `encoder` is the pretrained-style
    body, `classifier` the new head: the names param_groups patterns pick."""

    def __init__(self, seed=0, vocab=50, dim=16, num_labels=3):
        super().__init__()
        torch.manual_seed(seed)
        self.encoder = nn.ModuleDict(
            {"embed": nn.Embedding(vocab, dim), "proj": nn.Linear(dim, dim), "norm": nn.LayerNorm(dim)}
        )
        self.classifier = nn.Linear(dim, num_labels)

    def forward(self, input_ids, attention_mask=None):
        h = self.encoder["embed"](input_ids)
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        h = (h * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True)
        return self.classifier(self.encoder["norm"](torch.relu(self.encoder["proj"](h))))


def cross_entropy_over_items(outputs, labels, num_items_in_batch=None):
    """A compute_loss_func with Trainer's contract: summed over the micro-batch, normalised by the window's items."""
    loss = nn.functional.cross_entropy(outputs, labels, reduction="sum")
    return loss / num_items_in_batch if num_items_in_batch is not None else loss / labels.numel()


def doc_block(first_line: str) -> str:
    """The fenced code block of the README or docs/ that starts with `first_line` (tests run what the docs show)."""
    for _, _, body, _ in doc_blocks():
        if body.startswith(first_line):
            return body
    raise AssertionError(f"no block in README.md or docs/ starts with {first_line!r}")


def doc_blocks():
    """(file, language, body, marker) for every fenced block of README.md and docs/**/*.md, in order; marker is the
    HTML comment on the line before the fence (`<!-- gpu -->`, `<!-- manual: why -->`) or ''."""
    import glob
    import os
    import re

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    files = [os.path.join(root, "README.md")] + sorted(
        glob.glob(os.path.join(root, "docs", "**", "*.md"), recursive=True)
    )
    for path in files:
        text = open(path).read()
        for m in re.finditer(r"(?:(<!--[^\n]*-->)\n)?```([a-z]*)\n(.*?)```", text, flags=re.S):
            yield os.path.relpath(path, root), m.group(2), m.group(3), m.group(1) or ""


# ---------------------------------------------------------------------------------------------- shared assertions
TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)
WORKERS = os.path.join(TESTS, "workers")  # scripts the integration tests launch as processes
ENV = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "2"}


def assert_same(expected, got):
    assert len(expected) == len(got), (len(expected), len(got))
    for a, b in zip(expected, got):
        a, b = comparable(a), comparable(b)
        assert a.keys() == b.keys(), (a.keys(), b.keys())
        for k in a:
            assert a[k] == b[k], f"step {a.get('step')} {k}: trainer {a[k]!r} loop {b[k]!r}"


def same_history(a, b):
    a, b = [comparable(r) for r in a], [comparable(r) for r in b]
    assert len(a) == len(b), (len(a), len(b))
    for x, y in zip(a, b):
        assert x == y, (x, y)


def run_loop(*args, timeout=600):
    return subprocess.run(
        [sys.executable, "-m", "loop", *args], capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=timeout
    )


def assert_one_line_error(proc, *needles):
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    for n in needles:
        assert n in lines[0], lines[0]


# ---------------------------------------------------------------------------------------------- Trainer code, as users write it
from transformers import TrainerCallback  # noqa: E402


def seeds(Base):
    """The subclasses people write, for either Trainer: only the base class (the import) differs."""

    class CustomTrainer(Base):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            labels = inputs.pop("labels")
            logits = model(**inputs)
            loss = nn.functional.cross_entropy(logits, labels)
            return (loss, logits) if return_outputs else loss

    class EMATrainer(Base):
        def training_step(self, model, inputs, num_items_in_batch=None):
            loss = super().training_step(model, inputs, num_items_in_batch)
            with torch.no_grad():
                if not hasattr(self, "ema"):
                    self.ema = {n: p.detach().clone() for n, p in model.named_parameters()}
                for n, p in model.named_parameters():
                    self.ema[n].mul_(0.9).add_(p.detach(), alpha=0.1)
            return loss

    class CustomOptimizerTrainer(Base):
        def create_optimizer(self, model=None):
            if self.optimizer is None:
                self.optimizer = torch.optim.SGD(
                    [
                        {"params": list(self.model.encoder.parameters()), "lr": 1e-3},
                        {"params": list(self.model.classifier.parameters()), "lr": 1e-2},
                    ],
                    lr=1e-2,
                    momentum=0.9,
                )
            return self.optimizer

    class CustomSchedulerTrainer(Base):
        def create_scheduler(self, num_training_steps, optimizer=None):
            if self.lr_scheduler is None:
                self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
                    optimizer or self.optimizer, lambda step: 0.5 ** (step // 3) * (1 - step / num_training_steps)
                )
            return self.lr_scheduler

    return CustomTrainer, EMATrainer, CustomOptimizerTrainer, CustomSchedulerTrainer


def trainer_args(output_dir, **kw):
    """The parity tests' TrainingArguments for a CPU run: windows of 2 micro-batches of 4, 8 steps, every loss logged,
    an evaluation every 4 steps, nothing saved; `kw` overrides."""
    from transformers import TrainingArguments

    base = dict(
        per_device_train_batch_size=4,
        per_device_eval_batch_size=5,
        gradient_accumulation_steps=2,
        learning_rate=1e-2,
        max_steps=8,
        logging_steps=1,
        eval_strategy="steps",
        eval_steps=4,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
        seed=7,
    )
    return TrainingArguments(output_dir=str(output_dir), **{**base, **kw})


def worker_args(output_dir, **kw):
    """The TrainingArguments of the torchrun workers' Trainer runs: windows of 2 micro-batches of 3, 5 steps, every
    loss logged, one evaluation at the end."""
    from transformers import TrainingArguments

    base = dict(
        per_device_train_batch_size=3,
        gradient_accumulation_steps=2,
        max_steps=5,
        logging_steps=1,
        learning_rate=1e-2,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
        label_names=["labels"],
        eval_strategy="steps",
        eval_steps=5,
        per_device_eval_batch_size=3,
    )
    return TrainingArguments(output_dir=output_dir, **{**base, **kw})


class LossLoggingCallback(TrainerCallback):
    """The seeds' callback: the last logged loss from state.log_history at every step end."""

    def __init__(self):
        self.losses = []

    def on_step_end(self, args, state, control, **kwargs):
        if state.log_history and "loss" in state.log_history[-1]:
            self.losses.append((state.global_step, state.log_history[-1]["loss"]))
