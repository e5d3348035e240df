"""Pass/fail checks that need a CUDA GPU: `python -m pytest tests/gpu` on a GPU machine (skipped elsewhere).

What the CPU suite cannot run: the CUDA-only levers of `fast` (the recorded step, the flash varlen kernel, the Triton
chunk of the fused loss), that each engages where the plan says and gives the eager path's numbers, and that the
caller's model is handed back as it was after them. Each test takes seconds to a minute on one H200.
"""

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # tests/: helpers

from helpers import PackedLM, fingerprint  # noqa: E402

import loop  # noqa: E402
from loop import TrainConfig  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
ROOT = os.path.dirname(os.path.dirname(HERE))
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}


def gpt2_small(dropout=0.0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(
        GPT2Config(
            vocab_size=1000,
            n_positions=128,
            n_embd=128,
            n_layer=2,
            n_head=4,
            resid_pdrop=dropout,
            embd_pdrop=dropout,
            attn_pdrop=dropout,
        )
    )


def packed(n_docs, block=128, vocab=1000, seed=0):
    data = PackedLM(n_docs, block=block, seed=seed, vocab=vocab)
    return [data[i] for i in range(len(data))]


def _train(tmp_path, name, model, data, callbacks=None, **fields):
    cfg = dict(
        output_dir=str(tmp_path / name),
        max_steps=12,
        per_device_train_batch_size=8,
        learning_rate=1e-3,
        logging_steps=1,
        save_strategy="no",
        bf16=True,
        disable_tqdm=True,
        report_to="none",
        telemetry=False,
    )
    return loop.train(TrainConfig(**{**cfg, **fields}), model, train_dataset=data, callbacks=callbacks)


def test_fast_engages_every_cuda_lever_on_packed_gpt2_and_hands_the_model_back(tmp_path):
    model = gpt2_small()
    model.config.use_cache = False
    before = fingerprint(model)
    result = _train(tmp_path, "fast", model, packed(400), fast=True)
    plan = result.fast
    for lever in ("dataset_on_device", "fused_linear_cross_entropy", "varlen_attention", "cuda_graph_step"):
        assert getattr(plan, lever).on, (lever, getattr(plan, lever))
    assert plan.optim == "adamw_torch_fused"
    losses = [r["loss"] for r in result.log_history if "loss" in r]
    assert len(losses) == 12 and all(map(lambda x: x == x, losses)) and losses[-1] < losses[0]
    assert fingerprint(model) == before  # attention implementation, head, wrappers: as handed over
    ids = torch.randint(0, 1000, (2, 16), device=next(model.parameters()).device)
    with torch.no_grad():
        assert model(input_ids=ids).logits.shape == (2, 16, 1000)


def test_fast_steps_between_logs_make_no_host_device_sync(tmp_path):
    """Under fast (the training set on the device, the recorded step) the steps between two logs make no call that
    waits for the GPU (the loop's rule: syncs only at log boundaries): the profiler sees no cudaStreamSynchronize over
    10 steps, and no cudaDeviceSynchronize but its own as it stops."""

    class Profile(loop.Callback):
        def __init__(self):
            self.prof = None

        def on_step_end(self, run):
            step = run.state.global_step
            if step == 15:
                self.prof = torch.profiler.profile(
                    activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
                )
                self.prof.__enter__()
            elif step == 25:
                self.prof.__exit__(None, None, None)

    probe = Profile()
    fields = dict(max_steps=30, logging_steps=30, fast=True)  # one log, after the profiled steps
    result = _train(tmp_path, "fast", gpt2_small(), packed(400), callbacks=[probe], **fields)
    assert result.fast.dataset_on_device.on and result.fast.cuda_graph_step.on
    names = [e.name for e in probe.prof.events()]
    assert names.count("cudaGraphLaunch") >= 10  # the recorded step ran in the profiled window
    # one cudaDeviceSynchronize is the profiler's own, as it stops
    assert names.count("cudaStreamSynchronize") == 0 and names.count("cudaDeviceSynchronize") <= 1, [
        n for n in names if "Synchronize" in n
    ]


def test_fast_path_stays_with_the_default_path_on_packed_gpt2(tmp_path):
    """Without dropout the fast path (fused loss, varlen attention, the recorded compiled step) follows the default
    path's loss curve within bf16 rounding."""
    plain = _train(tmp_path, "plain", gpt2_small(), packed(400))
    fast = _train(tmp_path, "fast", gpt2_small(), packed(400), fast=True)
    a = [r["loss"] for r in plain.log_history if "loss" in r]
    b = [r["loss"] for r in fast.log_history if "loss" in r]
    assert len(a) == len(b) == 12
    assert max(abs(x - y) / x for x, y in zip(a, b)) < 2e-2, (a, b)


def test_recorded_step_equals_the_eager_step_with_deterministic_kernels(tmp_path):
    """cuda_graph_step replays the eager step's kernels: with deterministic kernels, dropout on and a schedule that
    moves the learning rate, the losses and grad norms equal the compiled eager step's to the bit."""
    from loop.bench import WORKLOADS
    from loop.job import build_job, build_task

    rows = {}
    for side in ("eager", "graphs"):
        argv = WORKLOADS["tiny-bert"] + [
            "--max_steps",
            "30",
            "--logging_steps",
            "1",
            "--disable_tqdm",
            "true",
            "--bf16",
            "true",
            "--lr_scheduler_type",
            "linear",
            "--warmup_steps",
            "10",
            "--torch_compile",
            "true",
            "--dataset_on_device",
            "true",
            "--full_determinism",
            "true",
            "--save_strategy",
            "no",
            "--cuda_graph_step",
            "true" if side == "graphs" else "false",
            "--output_dir",
            str(tmp_path / side),
        ]
        config, module, task = build_job(argv)
        result = loop.train(config, **build_task(module, task, config))
        assert result.fast.cuda_graph_step.on is (side == "graphs")
        rows[side] = [(r["step"], r["loss"], r["grad_norm"]) for r in result.log_history if "loss" in r]
    assert len(rows["eager"]) == 30 and rows["eager"] == rows["graphs"]


def test_varlen_attention_is_the_block_diagonal_attention_on_the_gpu():
    """The flash varlen kernel against SDPA with transformers' dense block-diagonal mask, at dropout 0: outputs and
    gradients within what bf16 rounding gives either."""
    from loop import varlen_attention as va

    torch.manual_seed(0)
    B, T, H, D, dev = 4, 256, 4, 64, "cuda"
    rows = []
    for _ in range(B):
        row, left = [], T
        while left:
            n = min(left, int(torch.randint(1, 80, (1,))))
            row += list(range(n))
            left -= n
        rows.append(row)
    pos = torch.tensor(rows, device=dev)
    starts = va.document_starts(pos, B, T)
    doc = starts.cumsum(-1)
    mask = (doc[:, None, :, None] == doc[:, None, None, :]) & torch.ones(T, T, dtype=torch.bool, device=dev).tril()
    qkv = torch.randn(3, B, H, T, D, device=dev, dtype=torch.bfloat16, requires_grad=True)

    mod = SimpleNamespace(is_causal=True, _loop_varlen_segments=int(starts.sum()) + 5)  # a bound above the count

    def run(fn):
        qkv.grad = None
        out = fn(*qkv)
        (out.float() * torch.linspace(-1, 1, out.numel(), device=dev).view(out.shape)).sum().backward()
        return out.detach().float(), qkv.grad.float()

    ref_o, ref_g = run(
        lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2)
    )
    got_o, got_g = run(
        lambda q, k, v: va.attention(mod, q, k, v, None, dropout=0.0, scaling=D**-0.5, position_ids=pos)[0]
    )
    assert (got_o - ref_o).abs().max() <= 2e-2 * ref_o.abs().max()
    assert (got_g - ref_g).abs().max() <= 2e-2 * ref_g.abs().max()


def test_fused_loss_equals_the_plain_loss_on_the_gpu():
    from loop.fused_loss import linear_cross_entropy

    torch.manual_seed(0)
    hidden = torch.randn(2048, 256, device="cuda", requires_grad=True)
    weight = torch.randn(50257, 256, device="cuda", requires_grad=True)
    targets = torch.randint(0, 50257, (2048,), device="cuda")
    targets[::5] = -100
    fused = linear_cross_entropy(hidden, weight, targets)
    fused.backward()
    got = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    plain = torch.nn.functional.cross_entropy(hidden @ weight.t(), targets, ignore_index=-100)
    plain.backward()
    assert abs(fused.item() - plain.item()) <= 1e-5 * abs(plain.item())
    for g, r in zip(got, (hidden.grad, weight.grad)):
        assert (g - r).abs().max().item() <= 1e-4 * r.abs().max().item()


def test_fused_loss_triton_softmax_equals_inductors_chunk_in_bf16():
    """The Triton kernel the loss runs on CUDA against the same chunk maths compiled by inductor (what ran before it),
    in bf16 with ignored rows and GPT-2's unaligned vocabulary: the loss to fp32 rounding, gradients to bf16's."""
    from loop import fused_loss

    torch.manual_seed(0)
    hidden = (torch.randn(3000, 256, device="cuda") * 0.5).to(torch.bfloat16)
    weight = torch.cat([torch.randn(50257, 256, device="cuda") * 0.05, torch.zeros(47, 256, device="cuda")])
    weight = weight.to(torch.bfloat16)
    targets = torch.randint(0, 50257, (3000,), device="cuda")
    targets[::7] = -100
    assert fused_loss._chunk_fn(hidden.device) is fused_loss._chunk_triton
    got = fused_loss._chunk_triton(hidden, weight, targets, 50257)
    ref = torch.compile(fused_loss._chunk, dynamic=False)(hidden, weight, targets, 50257)
    assert abs(got[0].item() - ref[0].item()) <= 1e-6 * abs(ref[0].item())
    for g, r in zip(got[1:], ref[1:]):
        assert (g.float() - r.float()).abs().max().item() <= 1e-2 * r.float().abs().max().item()


def test_compare_reports_parity_in_bf16_on_the_gpu(tmp_path):
    """The default job, bf16, under Trainer and the loop: PARITY within Trainer's own run-to-run spread."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "loop",
            "compare",
            "--max_steps",
            "20",
            "--logging_steps",
            "1",
            "--eval_strategy",
            "no",
            "--save_strategy",
            "no",
            "--bf16",
            "true",
            "--trainer_runs",
            "2",
            "--disable_tqdm",
            "true",
            "--output_dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=ENV,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.load(open(tmp_path / "compare.json"))
    assert report["parity"] is True
