"""Tiny models and data made on the spot (no downloads)."""

import copy

import torch
from torch import nn


def tiny_gpt2(seed=0, dropout=0.0, vocab=64):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_positions=32, n_embd=32, n_layer=2, n_head=2,
                                      resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout))


def tiny_bert_classifier(seed=0, dropout=0.1, num_labels=3):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    return BertForSequenceClassification(BertConfig(
        vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=32, num_labels=num_labels, hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout))


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
        docs = [torch.randint(0, vocab, (int(torch.randint(1, 24, (1,), generator=g)),), generator=g).tolist()
                for _ in range(n_docs)]
        self.rows = pack(docs, block, pad_id=0)

    def __len__(self):
        return len(self.rows["input_ids"])

    def __getitem__(self, i):
        return {k: torch.tensor(v[i]) for k, v in self.rows.items()}


def clone(model):
    return copy.deepcopy(model)


def comparable(record):
    """A log record without wall-clock values and loop-only keys."""
    return {k: v for k, v in record.items()
            if not k.endswith(("_runtime", "_per_second")) and not k.startswith("loop/")}


class SimpleClassifier(nn.Module):
    """Returns logits only, no loss (a research model trained with a custom loss). `encoder` is the pretrained-style
    body, `classifier` the new head: the names param_groups patterns pick."""

    def __init__(self, seed=0, vocab=50, dim=16, num_labels=3):
        super().__init__()
        torch.manual_seed(seed)
        self.encoder = nn.ModuleDict({"embed": nn.Embedding(vocab, dim), "proj": nn.Linear(dim, dim),
                                      "norm": nn.LayerNorm(dim)})
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


def readme_block(first_line: str) -> str:
    """The README's fenced code block that starts with `first_line` (so tests run exactly what the README shows)."""
    import os
    import re

    text = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")).read()
    for block in re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S):
        if block.startswith(first_line):
            return block
    raise AssertionError(f"no README block starts with {first_line!r}")
