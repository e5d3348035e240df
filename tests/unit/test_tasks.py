"""Both tasks on tiny local data; packing keeps documents apart and trains on the same targets as padding."""

import json
import os
import subprocess
import sys

import pytest
import torch
from helpers import tiny_gpt2

import loop
from loop.errors import LoopError
from loop.tasks import causal_lm, text_classification

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository


def _docs(seed=0, n=5):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 60, (int(L),), generator=g).tolist() for L in torch.randint(3, 12, (n,), generator=g)]


def test_pack_restarts_positions_and_never_targets_a_document_start():
    docs = _docs()
    rows = causal_lm.pack(docs, 16, pad_id=63)
    flat_ids = sum(rows["input_ids"], [])
    assert flat_ids[: sum(map(len, docs))] == sum(docs, [])
    for ids, pos, lab in zip(rows["input_ids"], rows["position_ids"], rows["labels"]):
        assert len(ids) == len(pos) == len(lab) == 16
        for i, p in enumerate(pos):
            if p == 0:
                assert lab[i] == -100  # no loss predicts a document's first token from another document
            else:
                assert pos[i - 1] == p - 1


def test_group_texts_cuts_the_joined_stream_into_rows_that_attend_across_documents():
    """run_clm.py's group_texts: the stream in order, full rows only, every token a target, no position restarts; and
    the model sees one stream (its loss on a row differs from the per-document packing of the same tokens)."""
    docs = _docs(n=9)
    rows = causal_lm.group_texts(docs, 8)
    stream = sum(docs, [])
    assert len(rows["input_ids"]) == len(stream) // 8 > 1
    assert sum(rows["input_ids"], []) == stream[: len(stream) // 8 * 8]  # the remainder is dropped
    assert rows["labels"] == rows["input_ids"] and "position_ids" not in rows
    model = tiny_gpt2(vocab=64).eval()
    grouped = {k: torch.tensor(v) for k, v in rows.items()}
    n = grouped["input_ids"].numel()
    # positions restarting at each document: transformers then keeps the documents apart
    per_doc = torch.tensor([p for d in docs for p in range(len(d))][:n]).view(-1, 8)
    with torch.no_grad():
        loss = model(**grouped, use_cache=False).loss
        plain = model(**grouped, position_ids=torch.arange(8).expand(len(rows["input_ids"]), 8), use_cache=False).loss
        isolated = model(**grouped, position_ids=per_doc, use_cache=False).loss
    torch.testing.assert_close(loss, plain, rtol=0, atol=0)  # one causal stream per row, positions 0..7
    assert abs(float(loss - isolated)) > 1e-3  # not what documents kept apart give


def test_group_texts_with_too_short_a_validation_split_stops_in_one_line_naming_block_size(tmp_path):
    text = tmp_path / "docs.jsonl"
    text.write_text("".join(json.dumps({"text": f"def f{i}(x): return {i}"}) + "\n" for i in range(30)))
    task = causal_lm.Task(train_file=str(text), tokenizer_name="bytes", group_texts=True, block_size=64)
    config = loop.TrainConfig(output_dir=str(tmp_path / "o"), use_cpu=True, eval_strategy="steps")
    with pytest.raises(LoopError, match="^group_texts left the validation split no full row of 64 tokens"):
        causal_lm.build(task, config)
    assert len(causal_lm.build(task, loop.TrainConfig(output_dir=str(tmp_path / "o"), use_cpu=True))["train_dataset"])


def _sum_loss(model, batch):
    # use_cache=False as in training: with a KV cache transformers does not look for packed sequences
    out = model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False)
    logits, labels = out.logits[:, :-1], batch["labels"][:, 1:]
    nll = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=-100, reduction="sum"
    )
    return nll, int((labels != -100).sum())


def test_packed_and_padded_give_the_same_loss_on_the_same_documents():
    model = tiny_gpt2(vocab=64).eval()
    docs = _docs(n=6)
    assert sum(map(len, docs)) <= 64  # one row: no document is cut by a row boundary
    packed = {k: torch.tensor(v) for k, v in causal_lm.pack(docs, 64, pad_id=63).items()}
    padded = causal_lm.pad_collator(63)([{"input_ids": d, "labels": d} for d in docs])
    with torch.no_grad():
        nll_p, n_p = _sum_loss(model, packed)
        nll_u, n_u = _sum_loss(model, padded)
        # and the model's own loss with num_items_in_batch (what the loop uses) agrees too
        loss_p = model(**packed, num_items_in_batch=torch.tensor(n_p), use_cache=False).loss
        loss_u = model(**padded, num_items_in_batch=torch.tensor(n_u), use_cache=False).loss
    assert n_p == n_u == sum(len(d) - 1 for d in docs)
    torch.testing.assert_close(nll_p, nll_u, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss_p, loss_u, rtol=1e-5, atol=1e-5)


def test_packing_without_position_ids_would_leak_across_documents():
    """The boundary test is not vacuous: drop the position_ids and the packed loss changes."""
    model = tiny_gpt2(vocab=64).eval()
    packed = {k: torch.tensor(v) for k, v in causal_lm.pack(_docs(n=6), 32, pad_id=63).items()}
    with torch.no_grad():
        isolated, _ = _sum_loss(model, packed)
        leaky, _ = _sum_loss(model, {k: v for k, v in packed.items() if k != "position_ids"})
    assert abs(float(isolated - leaky)) > 1e-3


def test_causal_lm_trains_packed_unpacked_and_grouped_from_local_text(tmp_path):
    text = tmp_path / "docs.jsonl"
    with open(text, "w") as f:
        for i in range(60):
            f.write(json.dumps({"text": f"def f{i}(x):\n    return x * {i} + {i % 7}\n"}) + "\n")
    for packing, group in (("true", "false"), ("false", "false"), ("true", "true")):  # group: run_clm.py's rows
        out = tmp_path / f"out_{packing}_{group}"
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "loop",
                "train",
                "--text_source",
                "none",
                "--train_file",
                str(text),
                "--max_steps",
                "20",
                "--packing",
                packing,
                "--group_texts",
                group,
                "--block_size",
                "64",
                "--output_dir",
                str(out),
                "--eval_steps",
                "10",
                "--save_strategy",
                "no",
                "--disable_tqdm",
                "true",
                "--max_docs",
                "none",
                "--logging_steps",
                "10",
            ],
            capture_output=True,
            text=True,
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": ROOT},
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        evals = [json.loads(line) for line in open(out / "metrics.jsonl") if "eval_loss" in line]
        assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]


def _tiny_encoder(folder):
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    words = ["good", "great", "fun", "bad", "awful", "dull", "movie", "the", "a", "was", "plot", "acting"]
    tok = BertTokenizerFast(vocab={w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words)})
    torch.manual_seed(0)
    model = BertForSequenceClassification(
        BertConfig(
            vocab_size=len(words) + 5,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=64,
            num_labels=2,
        )
    )
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return words


def _sentiment_tsv(path, n, seed):
    import random

    rng = random.Random(seed)
    pos, neg = ["good", "great", "fun"], ["bad", "awful", "dull"]
    with open(path, "w") as f:
        f.write("label\tsentence\n")
        for _ in range(n):
            y = rng.randint(0, 1)
            words = [rng.choice(pos if y else neg)] + rng.sample(["the", "movie", "was", "plot", "acting", "a"], 3)
            rng.shuffle(words)
            f.write(f"{y}\t{' '.join(words)}\n")


def test_text_classification_learns_tiny_sentiment_from_tsv(tmp_path):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    _tiny_encoder(model_dir)
    _sentiment_tsv(tmp_path / "train.tsv", 200, 0)
    _sentiment_tsv(tmp_path / "validation.tsv", 60, 1)
    task = text_classification.Task(
        model_name_or_path=str(model_dir),
        train_file=str(tmp_path / "train.tsv"),
        validation_file=str(tmp_path / "validation.tsv"),
    )
    config = loop.TrainConfig(
        output_dir=str(tmp_path / "out"),
        num_train_epochs=4,
        per_device_train_batch_size=16,
        learning_rate=3e-3,
        eval_strategy="epoch",
        save_strategy="epoch",
        save_total_limit=1,
        metric_for_best_model="accuracy",
        load_best_model_at_end=True,
        use_cpu=True,
        disable_tqdm=True,
        train_sampling_strategy="group_by_length",
        logging_steps=5,
    )
    built = text_classification.build(task, config)
    assert 1 not in built["train_dataset"][0]["input_ids"]  # no [UNK]: the tokenizer knows the words
    result = loop.train(config, **built)
    evals = [r for r in result.log_history if "eval_accuracy" in r]
    assert len(evals) == 4 and "eval_f1" in evals[-1]
    assert max(r["eval_accuracy"] for r in evals) >= 0.9, evals
    assert os.path.exists(tmp_path / "out" / "tokenizer.json")
    kept = [n for n in os.listdir(tmp_path / "out") if n.startswith("checkpoint-")]
    assert len(kept) == 1


def test_accuracy_f1():
    from transformers.trainer_utils import EvalPrediction

    m = text_classification.accuracy_f1(
        EvalPrediction(
            predictions=torch.tensor([[1.0, 0], [0, 1], [0, 1], [1, 0]]).numpy(),
            label_ids=torch.tensor([0, 1, 0, 0]).numpy(),
        )
    )
    assert m["accuracy"] == 0.75
    assert abs(m["f1"] - (0.8 + 2 / 3) / 2) < 1e-9


def test_built_in_text_and_data_files_together_are_refused(tmp_path):
    """The default job sets text_source stdlib; a --train_file given with it used to be ignored without a word."""
    import pytest

    (tmp_path / "t.txt").write_text("hello\n")
    config = loop.TrainConfig(output_dir=str(tmp_path / "o"), use_cpu=True)
    for module in (causal_lm, text_classification):
        task = module.Task(text_source="stdlib", train_file=str(tmp_path / "t.txt"), model_name_or_path="x")
        with pytest.raises(loop.LoopError, match="both name the data; add --text_source none to train on yours"):
            module.build(task, config)


def _labelled(tmp_path, name, rows):
    path = tmp_path / name
    path.write_text("sentence\tlabel\n" + "".join(f"{text}\t{label}\n" for text, label in rows))
    return str(path)


def test_task_options_that_would_hang_or_fail_deep_are_refused_in_one_line(tmp_path):
    """block_size 0 made packing loop forever; rows longer than the model's positions, or class ids outside
    0..num_labels-1 (an unlabelled test split holds -1), failed with an index error inside the first forward."""
    import pytest

    config = loop.TrainConfig(output_dir=str(tmp_path / "o"), use_cpu=True)
    small = {"n_positions": 64, "n_layer": 1, "n_embd": 16, "n_head": 2}
    train = _labelled(tmp_path, "train.tsv", [("good", 1), ("bad", 0), ("fine", 2)])
    unlabelled = _labelled(tmp_path, "test.tsv", [("what", -1), ("so", 1)])
    long = _labelled(tmp_path, "long.tsv", [("word " * 40, 0), ("x", 1)])
    cases = [
        (causal_lm, dict(text_source="stdlib", block_size=0), "block_size must be >= 2 tokens, got 0"),
        (causal_lm, dict(text_source="stdlib", validation_split_percentage=100), "between 1 and 99, got 100"),
        (
            causal_lm,
            dict(text_source="stdlib", block_size=128, model_config=small),
            "block_size 128 is longer than the model's 64 positions; use --block_size 64",
        ),
        (
            text_classification,
            dict(train_file=train, validation_file=train, model_config={}, max_length=1),
            "max_length must be >= 2",
        ),
        (
            text_classification,
            dict(train_file=train, validation_file=train, model_config={}, num_labels=2),
            "class ids from 0 to 2, but they must be 0..num_labels-1 .num_labels 2.: set --num_labels 3",
        ),
        (
            text_classification,
            dict(train_file=train, validation_file=unlabelled, model_config={}),
            "class ids from -1 to 2.*an unlabelled test split holds -1",
        ),
        (
            text_classification,
            dict(
                train_file=long,
                validation_file=long,
                tokenizer_name="bytes",
                model_config={
                    "max_position_embeddings": 64,
                    "num_hidden_layers": 1,
                    "hidden_size": 16,
                    "num_attention_heads": 2,
                    "intermediate_size": 32,
                    "vocab_size": 300,
                },
            ),
            "the longest tokenized row has 128 tokens, more than the model's 64 positions; use --max_length 64",
        ),
        # RoBERTa's position ids start after its padding index: of 66 embeddings, 64 hold tokens
        (
            text_classification,
            dict(
                train_file=long,
                validation_file=long,
                tokenizer_name="bytes",
                max_length=65,
                model_type="roberta",
                model_config={
                    "max_position_embeddings": 66,
                    "num_hidden_layers": 1,
                    "hidden_size": 16,
                    "num_attention_heads": 2,
                    "intermediate_size": 32,
                    "vocab_size": 300,
                },
            ),
            "the longest tokenized row has 65 tokens, more than the model's 64 positions",
        ),
    ]
    cases.append(
        (
            causal_lm,
            dict(text_source="stdlib", tokenizer_name="bytes", group_texts=True, packing=False),
            "group_texts joins documents into packed rows; set packing true",
        )
    )
    for module, fields, match in cases:
        with pytest.raises(loop.LoopError, match=match):
            module.build(module.Task(**fields), config)


def test_a_hub_id_offline_fails_at_once_naming_every_local_option(tmp_path):
    """HF_HUB_OFFLINE (set for the suite): one line before any Hub client retries, naming what points at the Hub and
    every local-path option."""
    import time

    from loop.tasks import text_classification

    task = text_classification.Task(
        model_name_or_path="someone/not-here", dataset_name="glue", dataset_config_name="sst2"
    )
    start = time.time()
    with pytest.raises(LoopError) as e:
        text_classification.build(task, loop.TrainConfig(output_dir=str(tmp_path), use_cpu=True))
    assert time.time() - start < 5
    line = str(e.value)
    assert "\n" not in line and "the Hub cannot be reached" in line
    for needle in (
        "--model_name_or_path someone/not-here",
        "--dataset_name glue",
        "--model_name_or_path FOLDER",
        "--tokenizer_name FOLDER",
        "--train_file FILE --validation_file FILE",
    ):
        assert needle in line, needle
    # a local folder is no Hub id: it is not refused here (the model's own loader reads it); nor is a job file's
    # dataset_name when local files are given (they are read instead: the offline recipe of sst2_minilm.yaml)
    task = text_classification.Task(
        model_name_or_path=str(tmp_path), train_file=str(tmp_path / "t.tsv"), dataset_name="glue"
    )
    with pytest.raises(LoopError, match="does not exist"):
        text_classification.build(task, loop.TrainConfig(output_dir=str(tmp_path), use_cpu=True))
