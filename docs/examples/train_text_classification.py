"""Text classification with transformers.Trainer, in the style of transformers' examples (run_glue.py): a tokenizer-free
BERT built from a config, a small sentiment-like dataset made on the spot, TrainingArguments from the command line.

    python docs/examples/train_text_classification.py --output_dir outputs/tc --max_steps 12
    loop compare --script docs/examples/train_text_classification.py --output_dir outputs/tc --max_steps 12

The second command runs this file unchanged twice, with transformers.Trainer and with loop.Trainer, and compares
their logs step by step.
"""

import numpy as np
import torch
from transformers import BertConfig, BertForSequenceClassification, HfArgumentParser, Trainer, TrainingArguments


def make_data(n, seed):
    """Rows of 16 token ids; the label is which of three token ranges dominates the row (learnable, not trivial)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        label = int(torch.randint(0, 3, (1,), generator=g))
        ids = torch.randint(1, 60, (16,), generator=g)
        ids[:8] = torch.randint(1 + 20 * label, 20 + 20 * label, (8,), generator=g)
        rows.append({"input_ids": ids, "attention_mask": torch.ones(16, dtype=torch.long), "labels": label})
    return rows


def compute_metrics(eval_pred):
    logits, labels = eval_pred
    return {"accuracy": float((np.argmax(logits, axis=-1) == labels).mean())}


def main():
    (args,) = HfArgumentParser(TrainingArguments).parse_args_into_dataclasses()
    torch.manual_seed(args.seed)
    model = BertForSequenceClassification(
        BertConfig(
            vocab_size=64,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=32,
            num_labels=3,
        )
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=make_data(96, 0),
        eval_dataset=make_data(24, 1),
        compute_metrics=compute_metrics,
    )
    result = trainer.train()
    trainer.log_metrics("train", result.metrics)
    print(trainer.evaluate())


if __name__ == "__main__":
    main()
