"""TrainConfig: Trainer's names and defaults, clear refusals, validation before any model is touched."""

import dataclasses

import pytest
import torch
from transformers import TrainingArguments

import loop
from loop.config import REFUSED, TrainConfig, coverage


def test_defaults_match_training_arguments():
    args = TrainingArguments(output_dir="x", report_to="none")
    cfg = TrainConfig()
    mismatched = []
    for f in dataclasses.fields(TrainConfig):
        if (
            f.metadata["group"] != "trainer"
            or not hasattr(args, f.name)
            or f.name in ("output_dir", "report_to", "disable_tqdm", "gradient_checkpointing")
        ):
            continue
        theirs = getattr(args, f.name)
        theirs = getattr(theirs, "value", theirs)
        if (
            f.name == "debug"
        ):  # TrainingArguments parses its string into a list of DebugOption; the loop keeps the string
            theirs = " ".join(o.value for o in theirs)
        if f.name == "accelerator_config":  # TrainingArguments makes its defaults an AcceleratorConfig; the loop: None
            theirs = None if theirs == type(theirs)() else theirs
        if getattr(cfg, f.name) != theirs:
            mismatched.append((f.name, getattr(cfg, f.name), theirs))
    assert not mismatched


def test_round_trip_through_training_arguments():
    cfg = TrainConfig(
        output_dir="o",
        learning_rate=3e-4,
        gradient_accumulation_steps=4,
        warmup_steps=0.1,
        lr_scheduler_type="cosine",
        eval_strategy="steps",
        eval_steps=7,
        bf16=False,
        seed=3,
    )
    back = TrainConfig.from_training_arguments(cfg.to_training_arguments(), telemetry=True)
    assert back == cfg


@pytest.mark.parametrize(
    "name,value",
    [("fsdp", "full_shard"), ("push_to_hub", True), ("hub_model_id", "me/x")],
)
def test_unsupported_training_arguments_are_refused_by_name(name, value):
    kwargs = {name: value}
    if name == "fsdp":
        pytest.skip("fsdp needs a distributed launch to construct TrainingArguments")
    args = TrainingArguments(output_dir="x", report_to="none", **kwargs)
    with pytest.raises(loop.LoopError, match=name):
        TrainConfig.from_training_arguments(args)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(fp16=True, bf16=True), "fp16 and bf16"),
        (dict(load_best_model_at_end=True), "needs evaluation"),
        (dict(load_best_model_at_end=True, eval_strategy="steps", save_strategy="epoch"), "match"),
        (dict(learning_rate=-1), "learning_rate"),
        (dict(optim="adamw"), "did you mean"),
        (dict(lr_scheduler_type="cosin"), "did you mean `cosine`"),
        (dict(max_steps=0), "nothing to train"),
        (dict(warmup_steps=2.5), "warmup_steps"),
        (dict(ema_decay=1.0), "ema_decay"),
        (dict(per_device_train_batch_size="four"), "not a valid int"),
        (dict(save_strategy="best"), "needs evaluation"),
        (dict(save_strategy="best", eval_strategy="epoch"), "metric_for_best_model. must be provided"),
        (dict(accelerator_config={"split_batch": True}), "unknown setting 'split_batch'.*split_batches"),
        (dict(accelerator_config={"use_configured_state": True}), "use_configured_state: the loop makes"),
        (
            dict(gradient_accumulation_steps=2, accelerator_config={"gradient_accumulation_kwargs": {"num_steps": 4}}),
            "num_steps. is set but",
        ),
        (dict(report_to="tensorbord"), "did you mean `tensorboard`"),
        (dict(seed=-1), "seed must be in"),
        (dict(data_seed=2**32), "data_seed must be in"),
        (dict(optim="sgd", optim_args="momentum=abc"), "momentum='abc' is not a number"),
        (
            dict(optim="sgd", optim_args="momentum=0.9,nestrov=true"),
            "nestrov: optim sgd does not use it .Trainer would ignore it.; it takes momentum, dampening",
        ),
        (dict(optim_args="beta1=0.95"), "optim adamw_torch_fused does not use it .* set adam_beta1"),
        (dict(optim="sgd", optim_args="momentum"), "malformed"),
        (dict(torch_compile_backend="inducto"), "is not a backend .did you mean `inductor`"),
        (dict(torch_compile_mode="fast"), "torch_compile_mode='fast' is not supported; choose one of: default"),
        (dict(dataloader_multiprocessing_context="bogus"), "choose one of: fork, spawn, forkserver"),
        (dict(max_grad_norm=float("nan")), "max_grad_norm is nan"),
        (dict(learning_rate="nan"), "learning_rate is nan"),
        (dict(torch_empty_cache_steps=0), "torch_empty_cache_steps must be >= 1"),
        (dict(eval_strategy="steps", eval_steps=-3), "needs eval_steps > 0"),
        (dict(lr_scheduler_kwargs="notjson"), "lr_scheduler_kwargs='notjson' is not a valid dict"),
    ],
)
def test_invalid_values_fail_at_construction(kwargs, match):
    with pytest.raises(loop.LoopError, match=match):
        TrainConfig(**kwargs)


def test_ddp_backend_reaches_the_process_group_settings_and_impossible_ones_are_refused(tmp_path):
    import torch.distributed

    from loop.run import make_accelerator

    acc = make_accelerator(TrainConfig(output_dir=str(tmp_path), use_cpu=True, ddp_backend="gloo"))
    assert acc.init_handler.backend == "gloo"
    assert make_accelerator(TrainConfig(output_dir=str(tmp_path), use_cpu=True)).init_handler.backend is None
    with pytest.raises(loop.LoopError, match="ddp_backend nccl needs CUDA GPUs and this run is on the CPU; use gloo"):
        make_accelerator(TrainConfig(output_dir=str(tmp_path), use_cpu=True, ddp_backend="nccl"))
    if not torch.distributed.is_backend_available("mpi"):
        with pytest.raises(loop.LoopError, match="ddp_backend mpi is not available in this torch build"):
            make_accelerator(TrainConfig(output_dir=str(tmp_path), use_cpu=True, ddp_backend="mpi"))
    with pytest.raises(loop.LoopError, match="did you mean `nccl`"):
        TrainConfig(ddp_backend="ncl")


def test_valid_optim_args_reach_the_optimizer():
    from loop.optim import build_optimizer

    model = torch.nn.Linear(2, 2)
    opt = build_optimizer(TrainConfig(optim="sgd", optim_args="momentum=0.9, nesterov=true"), model)
    assert opt.defaults["momentum"] == 0.9 and opt.defaults["nesterov"] is True
    opt = build_optimizer(TrainConfig(optim="rmsprop", optim_args="alpha=0.5,centered=1"), model)
    assert opt.defaults["alpha"] == 0.5 and opt.defaults["centered"] is True


def test_schedule_kwargs_are_tried_where_the_schedule_first_uses_them():
    """cosine_with_restarts reads num_cycles only after the warmup: a bad value is refused when the scheduler is
    built, not many steps into the run."""
    from loop.optim import build_scheduler

    opt = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1)
    bad = TrainConfig(lr_scheduler_type="cosine_with_restarts", lr_scheduler_kwargs={"num_cycles": "x"}, warmup_steps=5)
    with pytest.raises(loop.LoopError, match="num_cycles.*could not convert string to float"):
        build_scheduler(bad, opt, 100)
    good = TrainConfig(lr_scheduler_type="cosine_with_restarts", lr_scheduler_kwargs={"num_cycles": 2}, warmup_steps=5)
    assert build_scheduler(good, opt, 100).get_last_lr() == [0.0]


def test_a_tracker_that_is_not_installed_and_an_output_dir_that_cannot_be_written_are_refused(tmp_path, monkeypatch):
    """accelerate only warns about a tracker it cannot find and trains without it; the loop refuses, as Trainer does.
    An output_dir that cannot be made fails before training, not at the first record."""
    import accelerate.tracking
    from helpers import LMData, tiny_gpt2

    (tmp_path / "a_file").write_text("")
    config = TrainConfig(output_dir=str(tmp_path / "a_file" / "out"), use_cpu=True, max_steps=1)
    with pytest.raises(loop.LoopError, match="cannot be written .Not a directory.; choose a folder"):
        loop.train(config, tiny_gpt2(), LMData(8))
    monkeypatch.setattr(accelerate.tracking, "get_available_trackers", lambda: [])
    config = TrainConfig(output_dir=str(tmp_path / "out"), use_cpu=True, max_steps=1, report_to="tensorboard")
    with pytest.raises(loop.LoopError, match="report_to tensorboard: not installed; pip install tensorboard"):
        loop.train(config, tiny_gpt2(), LMData(8))
    assert not (tmp_path / "out" / "model.safetensors").exists()


@pytest.mark.parametrize(
    "rank0,local0,each_node,expect",
    [
        (True, True, True, "INFO"),  # rank 0 logs
        (False, True, True, "INFO"),  # the first process of node 1 logs too (log_on_each_node, Trainer's default)
        (False, True, False, "ERROR"),  # ... but not with log_on_each_node false
        (False, False, True, "ERROR"),  # any other process is a replica
    ],
)
def test_log_levels_follow_trainers_process_rule(rank0, local0, each_node, expect):
    import logging
    from types import SimpleNamespace

    from transformers.utils import logging as hf_logging

    from loop.run import apply_log_level

    before = hf_logging.get_verbosity()
    try:
        config = TrainConfig(log_level="info", log_level_replica="error", log_on_each_node=each_node)
        apply_log_level(config, SimpleNamespace(is_main_process=rank0, is_local_main_process=local0))
        assert hf_logging.get_verbosity() == getattr(logging, expect)
        hf_logging.set_verbosity(logging.CRITICAL)
        apply_log_level(
            TrainConfig(log_level="passive", log_level_replica="passive"),
            SimpleNamespace(is_main_process=rank0, is_local_main_process=local0),
        )
        assert hf_logging.get_verbosity() == logging.CRITICAL  # passive leaves it alone
    finally:
        hf_logging.set_verbosity(before)


def test_coverage_table_lists_every_field():
    rows = coverage()
    names = {r[0] for r in rows}
    assert names == {f.name for f in dataclasses.fields(TrainingArguments) if f.init}
    assert {r[1] for r in rows} <= {"mirrored", "mirrored*", "refused"}
    for name in REFUSED:
        if name in names:
            assert dict((r[0], r[1]) for r in rows)[name] == "refused"


def test_eval_steps_defaults_to_logging_steps_and_ratio_steps():
    cfg = TrainConfig(eval_strategy="steps", logging_steps=7)
    assert cfg.eval_steps == 7
    assert TrainConfig(logging_steps=0.1).steps_for("logging", 95) == 10
    assert TrainConfig(warmup_steps=0.06).warmup_for(100) == 6


def test_docs_coverage_table_is_the_generated_one():
    """docs/reference/training_arguments.md holds exactly `loop fields` output for the installed transformers: no row
    missing, none stale, same order (regenerate with `loop fields` when this fails)."""
    import os
    import re

    path = os.path.join(
        os.path.dirname(os.path.dirname(os.path.dirname(__file__))), "docs", "reference", "training_arguments.md"
    )
    table = [line for line in open(path).read().splitlines() if re.match(r"^\| `", line)]
    assert table == [f"| `{name}` | {status} | {note} |" for name, status, note in coverage()]


def test_mirrored_fields_have_trainers_defaults():
    """A field called mirrored (without a note) has TrainingArguments' name and default in TrainConfig."""
    import dataclasses

    from transformers import TrainingArguments

    ta = {f.name: f for f in dataclasses.fields(TrainingArguments)}
    ours = {f.name: f for f in dataclasses.fields(TrainConfig)}
    checked = 0
    for name, status, _ in coverage():
        if status != "mirrored" or name not in ours or name == "output_dir":
            continue
        theirs = ta[name].default if ta[name].default is not dataclasses.MISSING else ta[name].default_factory()
        mine = ours[name].default if ours[name].default is not dataclasses.MISSING else ours[name].default_factory()
        assert mine == theirs or (not mine and not theirs), (name, mine, theirs)
        checked += 1
    assert checked > 50


@pytest.mark.parametrize("user_set", [False, True])
def test_full_determinism_does_not_make_kernel_launches_blocking(monkeypatch, user_set):
    """transformers' helper sets CUDA_LAUNCH_BLOCKING=1, which Trainer never feels (its CUDA context exists before
    it seeds) but the loop would (it seeds first): every launch waiting for the GPU. Determinism itself stays on."""
    import os

    import torch

    from loop.run import seed_everything

    monkeypatch.delenv("ASCEND_LAUNCH_BLOCKING", raising=False)
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    monkeypatch.delenv("FLASH_ATTENTION_DETERMINISTIC", raising=False)
    if user_set:
        monkeypatch.setenv("CUDA_LAUNCH_BLOCKING", "1")
    else:
        monkeypatch.delenv("CUDA_LAUNCH_BLOCKING", raising=False)
    was = (
        torch.are_deterministic_algorithms_enabled(),
        torch.backends.cudnn.deterministic,
        torch.backends.cudnn.benchmark,
    )
    try:
        seed_everything(TrainConfig(output_dir="o", full_determinism=True))
        assert torch.are_deterministic_algorithms_enabled()
        assert os.environ.get("CUBLAS_WORKSPACE_CONFIG") == ":16:8"
        assert os.environ.get("CUDA_LAUNCH_BLOCKING") == ("1" if user_set else None)
        assert "ASCEND_LAUNCH_BLOCKING" not in os.environ
    finally:
        torch.use_deterministic_algorithms(was[0])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = was[1], was[2]


def test_fast_turns_foreach_adamw_into_fused_and_leaves_other_optimizers():
    from loop.fast import optimizer_name
    from loop.optim import build_optimizer

    assert optimizer_name(TrainConfig(output_dir="o", fast=True, optim="adamw_torch")) == "adamw_torch_fused"
    assert optimizer_name(TrainConfig(output_dir="o", fast=True, optim="sgd")) == "sgd"
    assert optimizer_name(TrainConfig(output_dir="o", optim="adamw_torch")) == "adamw_torch"  # not without fast
    model = torch.nn.Linear(2, 2)
    assert build_optimizer(TrainConfig(output_dir="o", fast=True, optim="adamw_torch"), model).defaults["fused"]
    assert not build_optimizer(TrainConfig(output_dir="o", optim="adamw_torch"), model).defaults.get("fused")
