"""The fast path's numerics on CPU: each fast feature gives the default path's numbers (fp32, to 1e-6 or 1e-5)."""

import os

import pytest
import torch
import torch.nn.functional as F
from helpers import ClsData, LMData, PackedLM, clone, tiny_bert_classifier, tiny_gpt2

import loop
import loop.step
from loop import TrainConfig
from loop.errors import LoopError
from loop.fused_loss import linear_cross_entropy


@pytest.mark.parametrize("num_items", [None, 250.0])
@pytest.mark.parametrize("chunk_rows", [64, 4096])
def test_fused_linear_cross_entropy_equals_plain_loss_and_gradients(num_items, chunk_rows):
    torch.manual_seed(0)
    n, d, vocab = 300, 16, 101  # 300 rows: a partial last chunk; 101: padded to 128 inside
    hidden = torch.randn(n, d, requires_grad=True)
    weight = torch.randn(vocab, d, requires_grad=True)
    targets = torch.randint(0, vocab, (n,))
    targets[::7] = -100
    fused = linear_cross_entropy(hidden, weight, targets, num_items, chunk_rows=chunk_rows)
    fused.backward()
    got = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    logits = hidden @ weight.t()
    plain = F.cross_entropy(logits, targets, ignore_index=-100, reduction="sum" if num_items else "mean")
    (plain / num_items if num_items else plain).backward()
    ref = plain / num_items if num_items else plain
    assert abs(fused.item() - ref.item()) <= 1e-6 * abs(ref.item())
    for g, r in zip(got, (hidden.grad, weight.grad)):
        assert (g - r).abs().max().item() <= 1e-6 * r.abs().max().item()


def _train(tmp_path, name, model, data=None, eval_data=None, **overrides):
    cfg = dict(
        output_dir=str(tmp_path / name),
        max_steps=6,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        learning_rate=3e-3,
        logging_steps=1,
        eval_strategy="steps",
        eval_steps=3,
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        report_to="none",
        telemetry=False,
    )
    cfg.update(overrides)
    data = LMData(48, ragged=True) if data is None else data
    eval_data = LMData(12, seed=1) if eval_data is None else eval_data
    return loop.train(TrainConfig(**cfg), model, train_dataset=data, eval_dataset=eval_data)


def assert_same_numbers(first, second, rel=1e-5):
    """Two 6-step runs of `_train`'s shape (evaluation at steps 3 and 6) log the same losses, grad norms and eval
    losses within `rel`."""
    a = [r for r in first.log_history if "loss" in r]
    b = [r for r in second.log_history if "loss" in r]
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]
    for x, y in zip(a, b):
        for key in ("loss", "grad_norm"):
            assert abs(x[key] - y[key]) <= rel * abs(x[key]), (key, x, y)
    ea = [r["eval_loss"] for r in first.log_history if "eval_loss" in r]
    eb = [r["eval_loss"] for r in second.log_history if "eval_loss" in r]
    assert len(ea) == len(eb) == 2 and all(abs(x - y) <= rel * x for x, y in zip(ea, eb))


def test_fused_loss_trains_like_the_model_own_loss_and_leaves_evaluation_and_weights_alone(tmp_path):
    from transformers import GPT2LMHeadModel

    model = tiny_gpt2()
    plain = _train(tmp_path, "plain", clone(model))
    fused = _train(tmp_path, "fused", clone(model), fused_linear_cross_entropy=True)
    assert_same_numbers(plain, fused)
    # the saved model is an ordinary GPT-2 whose logits are real logits (the head is only deferred in training)
    saved = GPT2LMHeadModel.from_pretrained(tmp_path / "fused").eval()
    ids = torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        assert saved(ids).logits.shape == (2, 16, 64)
        ref = GPT2LMHeadModel.from_pretrained(tmp_path / "plain").eval()(ids).logits
        assert (saved(ids).logits - ref).abs().max().item() < 1e-3


def test_fused_loss_is_refused_with_one_line_where_it_cannot_be_exact(tmp_path):
    with pytest.raises(LoopError, match="fused_linear_cross_entropy cannot be used here: it supports causal LMs"):
        loop.train(
            TrainConfig(
                output_dir=str(tmp_path / "cls"),
                max_steps=1,
                use_cpu=True,
                report_to="none",
                fused_linear_cross_entropy=True,
            ),
            tiny_bert_classifier(),
            train_dataset=ClsData(8),
        )
    with pytest.raises(LoopError, match="cannot serve a compute_loss_func or label_smoothing_factor"):
        loop.train(
            TrainConfig(
                output_dir=str(tmp_path / "own"),
                max_steps=1,
                use_cpu=True,
                report_to="none",
                fused_linear_cross_entropy=True,
                label_smoothing_factor=0.1,
            ),
            tiny_gpt2(),
            train_dataset=LMData(8),
        )
    assert not (tmp_path / "cls" / "model.safetensors").exists()


def test_fast_is_resolved_once_into_a_plan_and_the_config_keeps_what_was_asked(tmp_path):
    """TrainConfig rewrites nothing under `fast` (replace(cfg, fast=False) is the default path again); fast.resolve
    decides every lever for the run, with the reason for each one off, and the config's own fields win."""
    import dataclasses
    import json

    from transformers import default_data_collator

    from loop import fast

    config = TrainConfig(output_dir=str(tmp_path), fast=True, use_cpu=True, report_to="none", optim="adamw_torch")
    assert not config.torch_compile and config.optim == "adamw_torch" and config.ddp_find_unused_parameters is None
    assert fast.optimizer_name(config) == "adamw_torch_fused"
    assert fast.optimizer_name(dataclasses.replace(config, fast=False)) == "adamw_torch"
    assert fast.trainer_settings(config) == {
        "torch_compile": True,
        "optim": "adamw_torch_fused",
        "ddp_find_unused_parameters": False,
    }
    acc = loop.run.start(config)

    def plan(model, data, own_loss=False, **fields):
        cfg = dataclasses.replace(config, **fields)
        optimizer = torch.optim.AdamW(model.parameters())
        return fast.resolve(
            cfg, acc, model, data, default_data_collator, optimizer, own_loss=own_loss, custom_step=False
        )[0]

    lm = plan(tiny_gpt2(), LMData(16))
    assert lm.fused_linear_cross_entropy.on and lm.torch_compile.on and lm.dataset_on_device.on
    assert not lm.cuda_graph_step.on and "CUDA device" in lm.cuda_graph_step.why
    assert not lm.varlen_attention.on and "packed rows" in lm.varlen_attention.why
    assert lm.skip_causal_mask.on and lm.skip_causal_mask.why == "fast"  # plain causal rows
    assert lm.ddp_find_unused_parameters is False and lm.gradient_as_bucket_view and lm.ddp_compile_overlap is False
    assert lm.evaluate_eagerly and lm.optim == "adamw_torch_fused"
    assert "fused_linear_cross_entropy" in lm.report() and json.loads(json.dumps(lm.to_dict()))["fast"] is True
    # a classifier with its own loss function: the fused loss does not apply, and says why
    cls = plan(tiny_bert_classifier(), ClsData(16), own_loss=True)
    assert not cls.fused_linear_cross_entropy.on and "compute_loss_func" in cls.fused_linear_cross_entropy.why
    # the fields win over `fast`
    kept = plan(tiny_gpt2(), LMData(16), ddp_find_unused_parameters=True, ddp_compile_overlap=True)
    assert kept.ddp_find_unused_parameters is True and kept.ddp_compile_overlap is True
    # without `fast`, nothing is on and each lever says it was not asked for
    off = plan(tiny_gpt2(), LMData(16), fast=False)
    levers = [v for v in vars(off).values() if isinstance(v, fast.Lever)]
    assert len(levers) == 6 and all(not v.on and v.why == "not asked for" for v in levers)
    assert off.report() == [] and not off.gradient_as_bucket_view and off.ddp_find_unused_parameters is None


def test_compiled_model_loads_its_best_checkpoint_and_saves_plain_weights(tmp_path):
    """torch_compile (part of `fast`) wraps the model; best-model loading, resume and the final save must see the
    module itself (no `_orig_mod.` keys). Seen on a GPU: load_best_model_at_end failed under torch_compile.
    Evaluation in training runs the module itself, as Trainer's does (its evaluation_loop takes self.model): a forward
    run as Python, not as a compiled graph, happens for every evaluation batch and for no training batch."""
    from transformers import GPT2LMHeadModel

    model = tiny_gpt2()
    eager_forwards = []  # (training?) for each forward that ran as Python rather than as the compiled graph
    model.register_forward_pre_hook(
        lambda m, args: None if torch.compiler.is_compiling() else eager_forwards.append(m.training)
    )
    result = _train(
        tmp_path,
        "compiled",
        model,
        torch_compile=True,
        max_steps=4,
        eval_steps=2,
        save_strategy="steps",
        save_steps=2,
        load_best_model_at_end=True,
    )
    evals = [r for r in result.log_history if "eval_loss" in r]
    best = str(tmp_path / "compiled" / f"checkpoint-{min(evals, key=lambda r: r['eval_loss'])['step']}")
    assert len(evals) == 2 and os.path.isdir(best)
    # 12 eval rows at Trainer's default eval batch size 8: 2 batches an evaluation (training compiled: no eager forward)
    assert eager_forwards == [False] * 4
    final = GPT2LMHeadModel.from_pretrained(tmp_path / "compiled").state_dict()
    from safetensors.torch import load_file

    saved = load_file(os.path.join(best, "model.safetensors"))
    assert not any("_orig_mod" in k for k in list(final) + list(saved))
    assert len(saved) > 10 and all(torch.equal(final[k], saved[k]) for k in saved)


def test_fast_preset_end_to_end_matches_the_default_path(tmp_path, monkeypatch):
    """`fast` on CPU: compiled training with the fused loss, evaluation on the uncompiled module, the final save.
    Without dropout the logged numbers equal the default path's within 1e-5 (fp32)."""
    model = tiny_gpt2()
    plain = _train(tmp_path, "plain", clone(model))
    fast = _train(tmp_path, "fast", clone(model), fast=True)
    for key in ("loss", "grad_norm", "eval_loss"):
        a = [r[key] for r in plain.log_history if key in r]
        b = [r[key] for r in fast.log_history if key in r]
        assert len(a) == len(b) > 1 and all(abs(x - y) <= 1e-5 * abs(x) for x, y in zip(a, b)), (key, a, b)
    assert (tmp_path / "fast" / "model.safetensors").exists()

    # evaluation (other shapes, eval mode) goes through the uncompiled module: nothing is compiled for it
    import loop.evaluation as evaluation

    seen, plain_forward_loss = [], evaluation.forward_loss

    def spy(run, model, *args, **kwargs):
        seen.append(type(model).__name__)
        return plain_forward_loss(run, model, *args, **kwargs)

    monkeypatch.setattr(evaluation, "forward_loss", spy)
    trained = []
    monkeypatch.setattr(
        loop.step,
        "forward_loss",
        lambda run, m, *a, **k: trained.append(type(m).__name__) or plain_forward_loss(run, m, *a, **k),
    )
    _train(tmp_path, "spied", clone(model), fast=True, max_steps=3)
    assert seen and "OptimizedModule" not in seen and set(seen) == {"GPT2LMHeadModel"}
    # and training did run compiled, although earlier runs in this process were not (accelerate's process-wide
    # state used to keep the first run's setting)
    assert trained and set(trained) == {"OptimizedModule"}


class RaggedText(torch.utils.data.Dataset):
    """Token lists of 3..20 tokens (dynamic padding makes every batch a different width)."""

    def __init__(self, n, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.rows = [
            torch.randint(1, 50, (int(k),), generator=g).tolist() for k in torch.randint(3, 21, (n,), generator=g)
        ]
        self.y = torch.randint(0, 3, (n,), generator=g).tolist()

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return {"input_ids": self.rows[i], "attention_mask": [1] * len(self.rows[i]), "labels": self.y[i]}


def _train_cls(tmp_path, name, resume=None, data=None, collator=None, dropout=0.1, **overrides):
    from loop.tasks.text_classification import pad_collator

    cfg = dict(
        output_dir=str(tmp_path / name),
        num_train_epochs=2,
        per_device_train_batch_size=5,
        gradient_accumulation_steps=2,
        learning_rate=1e-3,
        logging_steps=1,
        save_strategy="steps",
        save_steps=5,
        use_cpu=True,
        disable_tqdm=True,
        report_to="none",
        seed=3,
    )
    cfg.update(overrides)
    return loop.train(
        TrainConfig(**cfg),
        tiny_bert_classifier(dropout=dropout),
        train_dataset=data or RaggedText(47),
        data_collator=collator or pad_collator(4),
        resume_from_checkpoint=resume,
    )


def test_dataset_on_device_gives_the_default_loaders_batches_and_numbers_and_resumes_exactly(tmp_path, monkeypatch):
    """The table cut per batch (width: the batch's longest row rounded to pad_to_multiple_of) must equal what the
    collator makes of the sampled rows: same losses and grad norms to the bit, with dropout, over two epochs with a
    partial last window, and a resume from a mid-epoch checkpoint."""
    import loop.data

    widths = []
    cut = loop.data.DeviceTable.__call__
    monkeypatch.setattr(
        loop.data.DeviceTable,
        "__call__",
        lambda self, p: (lambda b: widths.append(b["input_ids"].shape[1]) or b)(cut(self, p)),
    )
    plain = _train_cls(tmp_path, "plain")
    assert not widths  # off by default
    table = _train_cls(tmp_path, "table", dataset_on_device=True)
    assert len(set(widths)) > 1 and all(w % 4 == 0 for w in widths)  # dynamic widths, as the collator pads
    key = lambda r: (r["step"], r["loss"], r["grad_norm"])  # noqa: E731
    a, b = [key(r) for r in plain.log_history if "loss" in r], [key(r) for r in table.log_history if "loss" in r]
    assert len(a) == 10 and a == b
    resumed = _train_cls(tmp_path, "table", resume=str(tmp_path / "table" / "checkpoint-5"), dataset_on_device=True)
    assert [key(r) for r in resumed.log_history if "loss" in r][-5:] == a[-5:]


def test_device_table_keeps_narrow_columns_and_cuts_the_collators_batches():
    """The table holds each integer column in the narrowest dtype of its values (a quarter to an eighth of the
    collated set's bytes) and hands out the collator's batches: its dtypes and values, every width."""
    from loop.data import DeviceTable, _build_table, _nbytes, narrowest
    from loop.tasks.text_classification import pad_collator

    assert narrowest(torch.tensor([0, 1, 255])).dtype == torch.uint8
    assert narrowest(torch.tensor([-100, 0, 2])).dtype == torch.int8
    assert narrowest(torch.tensor([0, 30521])).dtype == torch.int16
    assert narrowest(torch.tensor([-100, 50256])).dtype == torch.int32
    assert narrowest(torch.tensor([0, 2**40])).dtype == torch.int64
    assert narrowest(torch.tensor([0.5, 2.0])).dtype == torch.float32
    data, collate = RaggedText(40), pad_collator(4)
    table, why = _build_table(data, collate, "cpu", "input_ids")
    assert why is None and isinstance(table, DeviceTable)
    full = collate([data[i] for i in range(len(data))])
    assert {k: v.dtype for k, v in table.columns.items()} == {
        "input_ids": torch.uint8,
        "attention_mask": torch.uint8,
        "labels": torch.uint8,
    }
    assert _nbytes(table.columns) * 8 == _nbytes(full)
    for pick in ([3], [0, 5, 9], list(range(40))[::-1]):
        want, got = collate([data[i] for i in pick]), table(pick)
        assert {k: (v.dtype, v.tolist()) for k, v in got.items()} == {k: (v.dtype, v.tolist()) for k, v in want.items()}
    chunks = list(table.chunks(size=16))
    assert [c["input_ids"].shape[0] for c in chunks] == [16, 16, 8]
    assert all(
        torch.equal(torch.cat([c[k] for c in chunks]), full[k]) and chunks[0][k].dtype == full[k].dtype for k in full
    )


def test_dataset_on_device_refuses_what_it_cannot_serve_and_fast_skips_it(tmp_path):
    from loop.tasks.text_classification import pad_collator

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter(RaggedText(20))

    with pytest.raises(LoopError, match="^dataset_on_device: the training set is iterable .*; set dataset_on_device"):
        _train_cls(tmp_path, "stream", data=Stream(), max_steps=2, dataset_on_device=True)

    def longest_first(features):  # depends on the other rows of the batch, not on each row's length
        return pad_collator(4)(sorted(features, key=lambda f: -len(f["input_ids"])))

    with pytest.raises(LoopError, match="batches depend on more than the rows' lengths"):
        _train_cls(tmp_path, "sorted", collator=longest_first, max_steps=2, dataset_on_device=True)
    assert not (tmp_path / "sorted" / "model.safetensors").exists()
    # `fast` keeps the default loader where the table does not apply (compile off here: only the data path matters)
    import loop.data

    assert loop.data.on_device_table(TrainConfig(fast=True), RaggedText(9), longest_first, "cpu") is None

    class Pairs(torch.utils.data.Dataset):  # rows as tuples: their lengths cannot be read
        def __len__(self):
            return 9

        def __getitem__(self, i):
            return RaggedText(9)[i]["input_ids"], i % 3

    def pairs(rows):
        return pad_collator(4)([{"input_ids": x, "attention_mask": [1] * len(x), "labels": y} for x, y in rows])

    assert loop.data.on_device_table(TrainConfig(fast=True), Pairs(), pairs, "cpu") is None
    with pytest.raises(LoopError, match="rows are not dicts holding a `input_ids` sequence"):
        loop.data.on_device_table(TrainConfig(dataset_on_device=True), Pairs(), pairs, "cpu")
    assert loop.data.on_device_table(TrainConfig(fast=True), RaggedText(9), pad_collator(4), "cpu") is not None


def test_fast_with_varying_widths_compiles_once_with_dynamic_shapes_and_keeps_the_numbers(tmp_path):
    """Dynamic padding under `fast`: the batches come from the device table, attention leaves cuDNN out, and the model
    is compiled once with dynamic shapes (torch.compile's default compiles the first width statically, then again at
    the second; and BERT's head setting config.problem_type at its first forward forced one more compilation).
    Without dropout the losses equal the default path's within 1e-5."""
    from torch._dynamo.utils import counters

    plain = _train_cls(tmp_path, "plain", dropout=0.0, max_steps=6, save_strategy="no")
    before = counters["stats"]["unique_graphs"]
    fast = _train_cls(tmp_path, "fast", dropout=0.0, max_steps=6, save_strategy="no", fast=True)
    assert counters["stats"]["unique_graphs"] - before == 1
    a, b = ([r["loss"] for r in h.log_history if "loss" in r] for h in (plain, fast))
    assert len(a) == len(b) == 6 and all(abs(x - y) <= 1e-5 * x for x, y in zip(a, b)), (a, b)


def test_fast_records_the_eager_step_instead_of_compiling_when_widths_vary(tmp_path, monkeypatch):
    """Dynamic padding with a recorded step (cuda_graph_step, CUDA only: faked here): `fast` leaves the model
    uncompiled, since compiling with dynamic shapes costs ~40 s for ~1 ms a step (SST-2: 56.9 s compiled, 17.9 s
    recorded eager). A named compile mode compiles anyway, with dynamic shapes; fixed widths compile as before."""
    from accelerate.utils import DynamoBackend
    from torch._dynamo.eval_frame import OptimizedModule

    import loop.graph_step as gs
    from loop.tasks.text_classification import pad_collator

    recorded = []  # a recorded step (CUDA only) faked: its checks pass, and the eager step stands in for the graph
    monkeypatch.setattr(gs, "why_not", lambda *a: None if recorded else "not recorded here")
    monkeypatch.setattr(gs, "GraphStep", lambda run: loop.step.optimizer_step)

    def build(name, data, collator, **cfg):
        config = TrainConfig(output_dir=str(tmp_path / name), fast=True, use_cpu=True, report_to="none", **cfg)
        given = loop.fit.Inputs(model=tiny_bert_classifier(), train_dataset=data, data_collator=collator)
        run = loop.fit.build(config, given, callbacks=[])
        assert run.loader.device_table is not None  # dataset_on_device, through `fast`
        return isinstance(run.model, OptimizedModule), run.accelerator.state.dynamo_plugin

    ragged, fixed = (RaggedText(9), pad_collator(4)), (RaggedText(9), pad_collator(20))  # rows of 3..20 tokens
    compiled, plugin = build("not-recorded", *ragged)
    assert compiled and plugin.dynamic is True
    recorded.append(True)
    compiled, plugin = build("recorded", *ragged)
    assert not compiled and plugin.backend == DynamoBackend.NO
    compiled, plugin = build("mode", *ragged, torch_compile_mode="default")
    assert compiled and plugin.dynamic is True
    compiled, plugin = build("fixed", *fixed)
    assert compiled and not plugin.dynamic


def test_attention_backends_hold_in_training_evaluation_and_loop_evaluate(tmp_path, monkeypatch):
    """attention_backends limits the SDPA kernels around every forward: training, evaluation during training and
    loop.evaluate (the spy reads the backend switches each call sees). A bad name is refused with one line."""
    import torch.backends.cuda as sdp

    seen, plain_sdpa = [], F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        seen.append(
            (sdp.flash_sdp_enabled(), sdp.mem_efficient_sdp_enabled(), sdp.cudnn_sdp_enabled(), sdp.math_sdp_enabled())
        )
        return plain_sdpa(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    model = tiny_gpt2()
    model.config._attn_implementation = "sdpa"
    _train(tmp_path, "math", model, attention_backends="math", max_steps=3)
    config = TrainConfig(
        output_dir=str(tmp_path / "ev"),
        use_cpu=True,
        report_to="none",
        disable_tqdm=True,
        attention_backends="efficient,math",
    )
    n = len(seen)
    loop.evaluate(config, model, LMData(8))
    assert n > 6 and set(seen[:n]) == {(False, False, False, True)}
    assert set(seen[n:]) == {(False, True, False, True)}
    with pytest.raises(LoopError, match="attention_backends='flash,cudnnn': cudnnn is not a kernel"):
        TrainConfig(attention_backends="flash,cudnnn")


def test_graph_step_bookkeeping_trains_like_the_eager_step_and_resumes_exactly(tmp_path, monkeypatch):
    """cuda_graph_step's host side, on CPU: the recorded body runs on the graph's own input buffers (record=False, no
    CUDA graph), so the shape keys, the buffer copies, the warm-up-then-replay order, the logged loss and the
    schedule/EMA tail must give the eager step's numbers to the bit: dynamic widths, accumulation 2 with a partial last
    window, dropout, EMA, four epochs, and a resume from a mid-epoch checkpoint. (The graphs themselves are checked on
    a GPU: benchmarks/gpu_speed.sh graphs.)"""
    import loop.graph_step as gs

    made = []
    monkeypatch.setattr(gs, "why_not", lambda *args: None)
    monkeypatch.setattr(gs, "WARMUP", 1)  # record at a shape's second window: more replays in a short run
    real = gs.GraphStep
    monkeypatch.setattr(gs, "GraphStep", lambda run: made.append(real(run, record=False)) or made[-1])
    common = dict(dataset_on_device=True, ema_decay=0.9, num_train_epochs=4, save_steps=10)
    plain = _train_cls(tmp_path, "plain", **common)
    graphed = _train_cls(tmp_path, "graphed", cuda_graph_step=True, **common)
    step = made[-1]
    assert len(step.graphs) >= 2 and sum(step.seen.values()) < 10  # several shapes, most steps replayed
    key = lambda r: (r["step"], r["loss"], r["grad_norm"], r["learning_rate"])  # noqa: E731
    a, b = [key(r) for r in plain.log_history if "loss" in r], [key(r) for r in graphed.log_history if "loss" in r]
    assert len(a) == 20 and a == b
    from safetensors.torch import load_file

    ema = [load_file(str(tmp_path / name / "ema" / "model.safetensors")) for name in ("plain", "graphed")]
    assert ema[0].keys() == ema[1].keys() and all(torch.equal(ema[0][k], ema[1][k]) for k in ema[0])
    resumed = _train_cls(
        tmp_path, "graphed", resume=str(tmp_path / "graphed" / "checkpoint-10"), cuda_graph_step=True, **common
    )
    assert [key(r) for r in resumed.log_history if "loss" in r][-10:] == a[-10:]


def test_graph_step_is_refused_in_one_line_where_it_cannot_record_and_fast_skips_it(tmp_path, monkeypatch):
    from types import SimpleNamespace

    import loop.graph_step as gs
    from loop.step import optimizer_step

    with pytest.raises(LoopError, match="^cuda_graph_step needs a CUDA device .*; set cuda_graph_step false$"):
        _train_cls(tmp_path, "cpu", max_steps=1, cuda_graph_step=True)
    assert not (tmp_path / "cpu" / "model.safetensors").exists()
    with pytest.raises(LoopError, match="torch_compile_mode reduce-overhead records CUDA graphs of its own"):
        TrainConfig(cuda_graph_step=True, torch_compile_mode="reduce-overhead")
    # `fast` on a CPU keeps the eager step
    from loop.tasks.text_classification import pad_collator

    run = loop.fit.build(
        TrainConfig(output_dir=str(tmp_path / "f"), fast=True, use_cpu=True, report_to="none"),
        loop.fit.Inputs(model=tiny_bert_classifier(), train_dataset=RaggedText(9), data_collator=pad_collator(4)),
        callbacks=[],
    )
    assert run.step_fn is optimizer_step

    def fake(device="cuda", procs=1, precision="bf16", optimizer=None, topology="NO", **cfg):
        p = torch.nn.Parameter(torch.zeros(2))
        opt = optimizer or torch.optim.AdamW([p], fused=False)
        config = SimpleNamespace(
            mixed_precision=precision,
            torch_compile_mode=None,
            gradient_checkpointing=False,
            **{"dataloader_pin_memory": True, "debug": "", **cfg},
        )
        return SimpleNamespace(
            config=config,
            optimizer=opt,
            loader=SimpleNamespace(device_table=object()),
            accelerator=SimpleNamespace(
                device=torch.device(device), num_processes=procs, distributed_type=SimpleNamespace(name=topology)
            ),
        )

    def why(run, custom_step=False):
        return gs.why_not(run.config, run.accelerator, run.optimizer, run.loader.device_table, custom_step)

    assert why(fake()) is None
    unpinned = fake(dataloader_pin_memory=False)
    unpinned.loader.device_table = None
    assert why(unpinned) is None  # asked for: allowed (unverified on a GPU) ...
    for run, says in (
        (fake(), "not a custom optimizer_step"),
        (fake(procs=2), "runs on one process"),
        (fake(topology="DEEPSPEED"), "not DeepSpeed's engine"),
        (fake(precision="fp16"), "fp16's loss scaler"),
        (fake(debug="underflow_overflow"), "debug underflow_overflow checks every module's output"),
        (SimpleNamespace(**{**vars(fake()), "loader": SimpleNamespace(device_table=None)}), "with pinned host batches"),
        (
            fake(optimizer=torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1)),
            "SGD cannot: use optim adamw_torch_fused",
        ),
    ):
        assert says in why(run, custom_step=says.startswith("not a custom"))
    # ... but `fast` takes it only where it was verified: batches cut from the device table (compiled or eager)
    for table, compiled, debug, taken in (
        (object(), True, "", True),
        (None, True, "", False),
        (object(), False, "", True),
        (object(), True, "underflow_overflow", False),
    ):
        run = fake(dataloader_pin_memory=False, fast=True, cuda_graph_step=None, torch_compile=compiled, debug=debug)
        lever = loop.fast.graph_lever(run.config, run.accelerator, run.optimizer, table, custom_step=False)
        assert lever.on is taken and (taken or lever.why)


def test_graph_step_feeds_the_schedule_to_the_recorded_optimizer_through_its_lr_tensors():
    """A recorded optimizer reads its learning rates from tensors; the scheduler keeps plain floats (no sync when
    logging them), and before every replay the current floats are filled into those tensors, per group."""
    from types import SimpleNamespace

    import loop.graph_step as gs

    params = [torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))]
    opt = torch.optim.AdamW([{"params": params[:1]}, {"params": params[1:], "lr": 0.5}], lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1 / (step + 1))
    step = gs.GraphStep(SimpleNamespace(optimizer=opt), record=False)
    step.lrs, step.filled = [torch.tensor(1.0), torch.tensor(0.5)], [1.0, 0.5]
    for _ in range(3):
        opt.step()
        sched.step()
        step._fill_lrs()
        assert [float(t) for t in step.lrs] == [float(torch.tensor(g["lr"])) for g in opt.param_groups]  # fp32
        assert all(type(g["lr"]) is float for g in opt.param_groups) and type(sched.get_last_lr()[0]) is float
    assert [float(t) for t in step.lrs] == [1 / 4, 0.5 / 4]


def test_varlen_attention_is_the_block_diagonal_attention_of_packed_rows():
    """The layout around the flash kernel (flattening, document boundaries, the fixed-size cu_seqlens, the scale),
    run on CPU through the same maths per document: loss, logits and every gradient equal transformers' SDPA path with
    its dense block-diagonal mask; a padded batch takes the model's own padded attention."""
    from loop import varlen_attention as va

    data = PackedLM(30)
    batch = {k: torch.stack([data[i][k] for i in range(6)]) for k in ("input_ids", "position_ids", "labels")}
    sdpa, varlen = tiny_gpt2(), tiny_gpt2()
    sdpa.config.use_cache = varlen.config.use_cache = False
    sdpa.set_attn_implementation("sdpa")
    counts = va.count_documents([{"position_ids": torch.stack([r["position_ids"] for r in data])}])
    assert counts.tolist() == [int((r["position_ids"] == 0).sum()) for r in data] and counts.max() > 1
    bound = va.segment_bound(counts, 6)
    assert bound == sum(sorted(counts.tolist())[-6:])
    va.enable(varlen, bound)
    # cu_seqlens: every document start, then zero-length sequences up to the bound; no host sync needed for its size
    starts = va.document_starts(batch["position_ids"], 6, 16)
    cu = va.cu_seqlens(starts, bound).tolist()
    n = int(starts.sum())
    assert len(cu) == bound + 1 and cu[:n] == torch.nonzero(starts.flatten()).flatten().tolist()
    assert cu[n:] == [6 * 16] * (bound + 1 - n)
    a, b = sdpa(**batch), varlen(**batch)
    a.loss.backward()
    b.loss.backward()
    assert abs(a.loss.item() - b.loss.item()) <= 1e-6 * a.loss.item()
    assert (a.logits - b.logits).abs().max().item() <= 1e-5
    for (name, p), q in zip(sdpa.named_parameters(), varlen.parameters()):
        assert (p.grad - q.grad).abs().max().item() <= 1e-6 * p.grad.abs().max().item() + 1e-9, name
    # a batch with a padding mask (left and right padding) is attended as transformers' SDPA path attends it
    mask = torch.ones(6, 16, dtype=torch.long)
    mask[0, 11:] = 0
    mask[1, :5] = 0
    with torch.no_grad():
        x, y = (
            sdpa(batch["input_ids"], attention_mask=mask).logits,
            varlen(batch["input_ids"], attention_mask=mask).logits,
        )
    assert torch.isfinite(y).all() and (x - y)[mask.bool()].abs().max().item() <= 1e-5


def test_skip_causal_mask_builds_no_mask_under_compile_and_trains_like_the_eager_default(tmp_path, monkeypatch):
    """Plain causal rows, compiled: the mask rule gives SDPA no mask where transformers' eager path gives none (no
    padding, no cache) and transformers' own mask otherwise; the run logs the eager default path's numbers, the model
    gets its attention back, and on packed rows the lever asked for is refused in one line."""
    from transformers.masking_utils import causal_mask_function, sdpa_mask

    from loop import causal_attention as ca

    kw = dict(batch_size=2, q_offset=0, kv_offset=0, mask_function=causal_mask_function, device="cpu")
    assert ca._mask(q_length=8, kv_length=8, **kw) is None
    pad = torch.ones(2, 8, dtype=torch.bool)
    pad[0, :3] = False
    for q_length, mask in ((8, pad), (3, pad[:, :8])):
        got = ca._mask(q_length=q_length, kv_length=8, attention_mask=mask, **kw)
        assert torch.equal(got, sdpa_mask(q_length=q_length, kv_length=8, attention_mask=mask, **kw))
    compiled = dict(torch_compile=True, torch_compile_backend="eager")  # dynamo without code generation

    def train(name, data=None, **overrides):
        model = tiny_gpt2()
        model.config.use_cache = False
        return _train(tmp_path, name, model, data, **overrides), model

    returned = []
    real_mask = ca._mask
    monkeypatch.setattr(ca, "_mask", lambda **kw: returned.append(real_mask(**kw)) or returned[-1])
    eager, _ = train("eager")
    assert not returned  # the default path leaves transformers' attention alone
    skip, model = train("skip", skip_causal_mask=True, **compiled)
    assert returned and all(m is None for m in returned)  # no mask was built, in training or evaluation
    assert skip.fast.skip_causal_mask.on and model.config._attn_implementation == "sdpa"
    assert_same_numbers(eager, skip, rel=1e-6)
    assert ca.NAME not in (tmp_path / "skip" / "config.json").read_text()
    with pytest.raises(
        LoopError,
        match="^skip_causal_mask cannot be used here: the training batches carry an attention_mask or position_ids "
        r"\(padded or packed rows\); set skip_causal_mask false$",
    ):
        train("packed", data=PackedLM(40), skip_causal_mask=True)


def test_varlen_attention_trains_like_the_block_mask_and_is_refused_in_one_line_where_it_cannot_run(
    tmp_path, monkeypatch
):
    from types import SimpleNamespace

    from loop import varlen_attention as va

    def train(name, **overrides):
        model = tiny_gpt2()
        model.config.use_cache = False
        return _train(tmp_path, name, model, PackedLM(60), eval_data=PackedLM(20, seed=1), **overrides), model

    # asked for on a CPU: one line, nothing written
    with pytest.raises(
        LoopError,
        match="^varlen_attention cannot be used here: it runs PyTorch's flash-attention "
        "kernel, which needs a CUDA device; set varlen_attention false$",
    ):
        train("cpu", varlen_attention=True, bf16=True)
    assert not (tmp_path / "cpu" / "model.safetensors").exists()
    # by default the model's attention is left as it is, and `fast` leaves it so where the kernel cannot run (a CPU)
    plain, plain_model = train("plain")
    assert plain_model.config._attn_implementation != va.NAME
    gpt = tiny_gpt2()
    lever, segments = loop.fast.varlen_lever(
        TrainConfig(output_dir=str(tmp_path / "f"), fast=True, bf16=True),
        SimpleNamespace(device=torch.device("cpu")),
        gpt,
        None,
        PackedLM(60),
        torch.utils.data.default_collate,
    )
    assert not lever.on and "needs a CUDA device" in lever.why and segments is None
    assert gpt.config._attn_implementation != va.NAME
    # where it applies (the CUDA checks waived, the per-document maths on CPU): the same run, step for step
    monkeypatch.setattr(va, "why_not", lambda *a: None)
    seen = []
    monkeypatch.setattr(
        loop.fit,
        "log_loss",
        lambda run, real=loop.fit.log_loss: (
            seen.append(
                (run.unwrapped.config._attn_implementation, run.unwrapped.transformer.h[0].attn._loop_varlen_segments)
            ),
            real(run),
        )[1],
    )
    varlen, model = train("varlen", varlen_attention=True)
    rows = torch.stack([r["position_ids"] for r in PackedLM(60)])
    assert set(seen) == {(va.NAME, va.segment_bound(va.count_documents([{"position_ids": rows}]), 4))}
    # and the caller's model has its own attention back afterwards
    assert model.config._attn_implementation == plain_model.config._attn_implementation != va.NAME
    assert not hasattr(model.transformer.h[0].attn, "_loop_varlen_segments")
    assert_same_numbers(plain, varlen)
    assert va.NAME not in (tmp_path / "varlen" / "config.json").read_text()  # the saved model loads anywhere
    monkeypatch.undo()
    # each refusal names its reason
    packed = {"input_ids": 0, "position_ids": 0}
    cuda = torch.device("cuda")
    for model, precision, batch, says in (
        (tiny_bert_classifier(), "bf16", packed, "not 'bert'"),
        (tiny_gpt2(), "bf16", {"input_ids": 0, "position_ids": 0, "attention_mask": 0}, "not packed rows"),
        (tiny_gpt2(), "bf16", {"input_ids": 0}, "not packed rows"),
        (tiny_gpt2(), "no", packed, "bf16/fp16 only"),
        (tiny_gpt2(), "bf16", packed, None),
    ):
        why = va.why_not(model, torch.device("cpu") if says is None else cuda, precision, batch)
        assert (says or "needs a CUDA device") in why
    odd = tiny_gpt2()
    odd.config.n_embd, odd.config.n_head = 36, 3  # head size 12
    assert "multiple of 8" in va.why_not(odd, cuda, "bf16", packed)


def test_fast_compiles_one_graph_under_ddp_unless_overlap_is_asked_for():
    """`fast` turns dynamo's DDP optimizer off for the run (one compiled graph, the all-reduce after the backward:
    41.4 against 46.4 ms a step for GPT-2 124M on 2 H200s); ddp_compile_overlap set either way wins, and torch's
    process-wide setting is put back after the run."""
    from types import SimpleNamespace

    from torch import _dynamo

    from loop.fast import Lever, ddp_levers

    def ddp_overlap_setting(config):
        plan = SimpleNamespace(
            torch_compile=Lever(config.torch_compile or config.fast, ""), ddp_compile_overlap=ddp_levers(config)[2]
        )
        return loop.fast.Plan.ddp_overlap(plan)

    before = _dynamo.config.optimize_ddp
    for kwargs, inside in (
        (dict(fast=True), False),
        (dict(fast=True, ddp_compile_overlap=True), True),
        (dict(torch_compile=True), before),
        (dict(torch_compile=True, ddp_compile_overlap=False), False),
    ):
        with ddp_overlap_setting(TrainConfig(**kwargs)):
            assert _dynamo.config.optimize_ddp == inside, kwargs
        assert _dynamo.config.optimize_ddp == before
