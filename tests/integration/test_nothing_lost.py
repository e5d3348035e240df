"""Nothing lost: a diverged run stops and never saves non-finite weights; checkpoint manifests catch damaged files."""

import json
import os

import pytest
import torch
from helpers import LMData, assert_one_line_error, tiny_gpt2
from helpers import run_loop as run
from safetensors.torch import load_file

import loop


def _diverging(tmp_path, **kw):
    return loop.TrainConfig(
        output_dir=str(tmp_path),
        use_cpu=True,
        per_device_train_batch_size=4,
        max_steps=40,
        learning_rate=1e3,
        max_grad_norm=0,
        logging_steps=4,
        save_steps=4,
        disable_tqdm=True,
        optim="sgd",
        **kw,
    )


def test_diverged_run_stops_with_one_line_and_saves_nothing_non_finite(tmp_path):
    with pytest.raises(loop.LoopError, match="training diverged: the loss or grad norm turned non-finite at step") as e:
        loop.train(_diverging(tmp_path), tiny_gpt2(), LMData(200))
    assert not os.path.exists(tmp_path / "model.safetensors")
    checkpoints = sorted(os.listdir(tmp_path))
    for name in checkpoints:
        if name.startswith("checkpoint-"):
            for v in load_file(str(tmp_path / name / "model.safetensors")).values():
                assert torch.isfinite(v).all(), name
    step = int(str(e.value).split("non-finite at step ")[1].split(" ")[0])
    saved = [int(n.split("-")[1]) for n in checkpoints if n.startswith("checkpoint-")]
    assert all(s < step for s in saved)
    if saved:
        assert f"checkpoint-{max(saved)}" in str(e.value)
    events = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert events[-1]["event"] == "diverged" and events[-1]["step"] == step
    # with the guard off the run carries on as Trainer does, to a non-finite final model
    loop.train(_diverging(tmp_path / "off", stop_on_nonfinite=False, save_strategy="no"), tiny_gpt2(), LMData(200))
    weights = load_file(str(tmp_path / "off" / "model.safetensors"))
    assert not all(torch.isfinite(v).all() for v in weights.values())


def test_diverging_default_job_exits_non_zero_with_one_line(tmp_path):
    proc = run(
        "train",
        "--learning_rate",
        "1e3",
        "--max_grad_norm",
        "0",
        "--max_steps",
        "60",
        "--output_dir",
        str(tmp_path),
        "--disable_tqdm",
    )
    assert_one_line_error(proc, "training diverged", "non-finite at step")
    assert not os.path.exists(tmp_path / "model.safetensors") and "done" not in proc.stdout


def _run(out, **kw):
    config = loop.TrainConfig(
        output_dir=str(out),
        use_cpu=True,
        per_device_train_batch_size=4,
        max_steps=12,
        logging_steps=2,
        save_steps=4,
        disable_tqdm=True,
        telemetry=False,
        learning_rate=1e-3,
        **kw,
    )
    return loop.train(config, tiny_gpt2(), LMData(40)).log_history


def _comparable(history):
    return [{k: v for k, v in r.items() if not k.endswith(("_runtime", "_per_second"))} for r in history]


def test_manifest_lists_every_file_and_damaged_checkpoints_are_skipped_on_resume(tmp_path):
    from loop import checkpoint as ckpt

    reference = _run(tmp_path / "ref")
    out = tmp_path / "run"
    _run(out)
    marker = json.load(open(out / "checkpoint-12" / "COMPLETE"))
    assert marker["step"] == 12 and {"model.safetensors", "optimizer.pt", "loop_state.json"} <= set(marker["files"])
    size, crc = marker["files"]["model.safetensors"]
    assert size == os.path.getsize(out / "checkpoint-12" / "model.safetensors") and len(crc) == 8
    # the newest is truncated (a half copy), the one before has a flipped bit (same size): both are skipped, loudly
    weights = out / "checkpoint-12" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: size // 2])
    opt = out / "checkpoint-8" / "optimizer.pt"
    data = bytearray(opt.read_bytes())
    data[len(data) // 2] ^= 0x01
    opt.write_bytes(bytes(data))
    assert [s for s, _ in ckpt.list_checkpoints(str(out))] == [4, 8]  # truncation: seen by size, never the newest
    with pytest.warns(UserWarning) as caught:
        assert ckpt.resolve_resume("latest", str(out)) == str(out / "checkpoint-4")
    text = " ".join(str(w.message) for w in caught)
    assert "checkpoint-12" in text and "truncated" in text and "checkpoint-8" in text and "checksum" in text
    with pytest.raises(loop.LoopError, match="does not match its checksum"):
        ckpt.resolve_resume(str(out / "checkpoint-8"), str(out))
    # resuming 'latest' ends with the uninterrupted run's log, and rewrites whole checkpoints 8 and 12
    resumed = _run(out, resume_from_checkpoint="latest")
    assert _comparable(resumed) == _comparable(reference)
    assert ckpt.damage(str(out / "checkpoint-12"), checksums=True) is None
    assert ckpt.damage(str(out / "checkpoint-8"), checksums=True) is None


def test_final_save_where_only_the_main_process_receives_the_gathered_weights(tmp_path):
    """Under ZeRO-3, get_state_dict gathers collectively and returns None on every rank but the main one. The final
    save (model and EMA) must pass through those ranks without touching the weights, and the main rank must write
    them. On 2 GPUs the ranks other than 0 crashed here at the end of every ZeRO-3 run."""
    from types import SimpleNamespace

    from loop.ema import EMA
    from loop.fit import save_model

    model = tiny_gpt2()
    ema = EMA(model, decay=0.5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # the EMA now differs from the model
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    shadow = [t.clone() for t in ema.shadow]

    def fake_run(main):
        acc = SimpleNamespace(
            is_main_process=main,
            wait_for_everyone=lambda: None,
            get_state_dict=lambda m: {f"module.{k}": v for k, v in m.state_dict().items()} if main else None,
        )
        return SimpleNamespace(
            accelerator=acc,
            config=SimpleNamespace(output_dir=str(tmp_path), save_on_each_node=False),
            model=model,
            unwrapped=model,
            ema=ema,
        )

    save_model(fake_run(main=False))  # another rank: no error, nothing written, the weights left as they were
    assert not os.path.exists(tmp_path / "model.safetensors") and not os.path.exists(tmp_path / "ema")
    assert all(torch.equal(v, expected[k]) for k, v in model.state_dict().items())
    save_model(fake_run(main=True))
    saved, saved_ema = load_file(tmp_path / "model.safetensors"), load_file(tmp_path / "ema" / "model.safetensors")
    assert torch.equal(saved["transformer.h.0.mlp.c_fc.weight"], expected["transformer.h.0.mlp.c_fc.weight"])
    names = [n for n, _ in model.named_parameters()]
    i = names.index("transformer.h.0.mlp.c_fc.weight")
    assert torch.equal(saved_ema["transformer.h.0.mlp.c_fc.weight"], shadow[i])
    assert not torch.equal(shadow[i], expected["transformer.h.0.mlp.c_fc.weight"])
    assert all(torch.equal(v, expected[k]) for k, v in model.state_dict().items())  # swapped back


def test_save_final_model_false_trains_and_checkpoints_the_same_but_writes_no_final_model(tmp_path):
    """`loop bench` and `loop compare` keep no final model (Trainer's train() writes none; a 1.5B model's is 6 GB).
    The run, its records and its checkpoints are those of the default run; only model.safetensors and ema/ are absent."""

    def config(out, **kw):
        return loop.TrainConfig(
            output_dir=str(out),
            use_cpu=True,
            per_device_train_batch_size=4,
            max_steps=6,
            logging_steps=2,
            save_steps=3,
            disable_tqdm=True,
            ema_decay=0.9,
            **kw,
        )

    kept = loop.train(config(tmp_path / "kept"), tiny_gpt2(), LMData(64))
    skipped = loop.train(config(tmp_path / "skipped", save_final_model=False), tiny_gpt2(), LMData(64))
    losses = lambda r: [(x["step"], x["loss"]) for x in r.log_history if "loss" in x]  # noqa: E731
    assert losses(kept) == losses(skipped) and len(losses(kept)) == 3
    assert os.path.exists(tmp_path / "kept" / "model.safetensors") and os.path.isdir(tmp_path / "kept" / "ema")
    assert not os.path.exists(tmp_path / "skipped" / "model.safetensors")
    assert not os.path.exists(tmp_path / "skipped" / "ema")
    assert sorted(n for n in os.listdir(tmp_path / "skipped") if n.startswith("checkpoint-")) == [
        "checkpoint-3",
        "checkpoint-6",
    ]


def test_one_process_reads_the_checksums_and_every_rank_takes_its_verdict(tmp_path, monkeypatch):
    """Resuming under several processes on one filesystem: rank 0 alone reads the checkpoint's every byte (each rank
    reading it would read it once per GPU); the other ranks take the step it found, and a damaged checkpoint it
    refuses stops them all with its line. Seen here from rank 1 of 2, rank 0's answers given by a fake gather."""
    from types import SimpleNamespace

    import accelerate.utils

    from loop import checkpoint as ckpt

    for step in (3, 6):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        (folder / "loop_state.json").write_text("{}")
        (folder / "model.safetensors").write_bytes(bytes(range(256)))
        (folder / "COMPLETE").write_text(json.dumps({"step": step, "files": ckpt.manifest(str(folder))}))
    reads = []
    real_damage = ckpt.damage
    monkeypatch.setattr(
        ckpt, "damage", lambda path, checksums=False: reads.append(path) if checksums else real_damage(path)
    )
    rank1 = SimpleNamespace(is_main_process=False, is_local_main_process=False, num_processes=2)
    rank0_says = iter([[3, 6], "model.safetensors does not match its checksum (corrupted)", None])  # 6 is damaged
    monkeypatch.setattr(accelerate.utils, "gather_object", lambda mine: [next(rank0_says), mine[0]])
    pending = ckpt.precheck_resume("latest", str(tmp_path))
    assert ckpt.verify_resume(rank1, pending, str(tmp_path), save_on_each_node=False) == str(tmp_path / "checkpoint-3")
    assert reads == []  # rank 1 read no checksum
    monkeypatch.setattr(accelerate.utils, "gather_object", lambda mine: ["it does not match", mine[0]])
    with pytest.raises(loop.LoopError, match="checkpoint-6 cannot be resumed: it does not match"):
        ckpt.verify_resume(
            rank1,
            ckpt.precheck_resume(str(tmp_path / "checkpoint-6"), str(tmp_path)),
            str(tmp_path),
            save_on_each_node=False,
        )
    assert reads == []
