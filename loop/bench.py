"""`loop bench`: training speed of Trainer and the loop, side by side, each side in a fresh process of its own.

    loop bench --workload gpt2-124m|gpt2-124m-llmc|bert-base|tiny-bert|minilm-sst2|tiny-gpt2 [--sides S1,..] [--steps N]
    loop bench --config JOB [...]           (any job file; --<field> VALUE overrides as in `loop train`)

Per side: ms per optimizer step, tokens/s and samples/s (steady state: the first steps are excluded as warm-up),
MFU, the whole training's time (train_runtime: warm-up and compilation included, which the steady rates leave out),
peak device memory, train_loss (the mean over the run) and the last logged loss. Writes
<output_dir>/bench.json (with each side's logged loss curve) and bench.png.

MFU = (6 N + 12 L H Q T) x tokens/s / peak FLOP/s: N all parameters, L layers, H heads, Q head size, T tokens per row
(the attention term of PaLM's appendix B); peak 989 TFLOP/s bf16 on an H100/H200 (--peak_tflops to set another).
Sides: trainer (eager), trainer-compiled, loop (default settings), loop-compiled, loop-fast (`fast: true`),
loop-trainer (the loop's default settings through loop.Trainer, the drop-in face); by
default trainer, trainer-compiled, loop, loop-fast. Each runs as one process on one device.
"""

from __future__ import annotations

import dataclasses
import json
import os

from .errors import LoopError, closest

_GPT2 = [
    "--task",
    "causal_lm",
    "--text_source",
    "stdlib",
    "--tokenizer_name",
    "bytes",
    "--model_type",
    "gpt2",
    "--packing",
    "true",
    "--eval_strategy",
    "no",
    "--eval_on_start",
    "false",
    "--save_strategy",
    "no",
    "--logging_steps",
    "10",
    "--max_eval_samples",
    "8",
    "--dataloader_num_workers",
    "2",
    "--lr_scheduler_type",
    "constant",
    "--warmup_steps",
    "0",
]
# The GPU workloads use Trainer's default optimizer, fused AdamW, on every side (the embedded default job they start
# from asks for adamw_torch, the foreach implementation, which takes about twice as long). GPT-2 124M is GPT-2's compute: its 50257-token vocabulary and 1024-token rows (the text is bytes; the ids do not
# change the FLOPs). tiny-gpt2 is a CPU smoke workload.
WORKLOADS = {
    "gpt2-124m": _GPT2
    + [
        "--model_config",
        '{"n_embd": 768, "n_layer": 12, "n_head": 12, "n_positions": 1024, "vocab_size": 50257}',
        "--block_size",
        "1024",
        "--max_docs",
        "1500",
        "--per_device_train_batch_size",
        "16",
        "--learning_rate",
        "6e-4",
        "--bf16",
        "true",
        "--optim",
        "adamw_torch_fused",
        "--output_dir",
        "outputs/bench-gpt2-124m",
    ],
    "tiny-gpt2": _GPT2
    + [
        "--model_config",
        '{"n_embd": 64, "n_layer": 2, "n_head": 2, "n_positions": 128}',
        "--block_size",
        "128",
        "--max_docs",
        "60",
        "--per_device_train_batch_size",
        "8",
        "--learning_rate",
        "1e-3",
        "--output_dir",
        "outputs/bench-tiny-gpt2",
    ],
}
# llm.c's GPT-2 124M settings (train_gpt2.cu), as options over gpt2-124m's (later options win): dropout 0, 64 rows of
# 1024 tokens an optimizer step (16 x accumulation 4; --per_device_train_batch_size 64 --gradient_accumulation_steps 1
# for one micro-batch), AdamW at 6e-4 with betas (0.9, 0.95), weight decay 0.1 and clipping at 1.0
WORKLOADS["gpt2-124m-llmc"] = WORKLOADS["gpt2-124m"] + [
    "--group_texts",  # llm.c's data: one token stream cut into rows, attention across documents
    "true",
    "--model_config",
    '{"n_embd": 768, "n_layer": 12, "n_head": 12, "n_positions": 1024, "vocab_size": 50257, '
    '"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}',
    "--gradient_accumulation_steps",
    "4",
    "--adam_beta2",
    "0.95",
    "--weight_decay",
    "0.1",
    "--max_grad_norm",
    "1.0",
    "--output_dir",
    "outputs/bench-gpt2-124m-llmc",
]
_BERT = [
    "--task",
    "text_classification",
    "--text_source",
    "stdlib",
    "--tokenizer_name",
    "bytes",
    "--eval_strategy",
    "no",
    "--save_strategy",
    "no",
    "--logging_steps",
    "10",
    "--max_eval_samples",
    "64",
    "--lr_scheduler_type",
    "constant",
    "--warmup_steps",
    "0",
    "--learning_rate",
    "5e-5",
    "--bf16",
    "true",
    "--dataloader_num_workers",
    "2",
    "--optim",
    "adamw_torch_fused",
]
# BERT shapes at their real vocabulary (30522), trained from scratch on stdlib lines (the compute is what matters).
# minilm-sst2 is the real SST-2 job: add --model_name_or_path/--train_file/--validation_file for offline copies.
WORKLOADS.update(
    {
        "bert-base": _BERT
        + [
            "--model_config",
            '{"vocab_size": 30522}',
            "--max_length",
            "128",
            "--pad_to_multiple_of",
            "128",
            "--max_docs",
            "300",
            "--per_device_train_batch_size",
            "32",
            "--output_dir",
            "outputs/bench-bert-base",
        ],
        "tiny-bert": _BERT
        + [
            "--model_config",
            '{"vocab_size": 30522, "hidden_size": 128, "num_hidden_layers": 2, '
            '"num_attention_heads": 2, "intermediate_size": 512}',
            "--max_length",
            "64",
            "--pad_to_multiple_of",
            "64",
            "--max_docs",
            "300",
            "--per_device_train_batch_size",
            "32",
            "--output_dir",
            "outputs/bench-tiny-bert",
        ],
        "minilm-sst2": [
            "--config",
            "tasks/configs/sst2_minilm.yaml",
            "--eval_strategy",
            "no",
            "--save_strategy",
            "no",
            "--load_best_model_at_end",
            "false",
            "--output_dir",
            "outputs/bench-minilm-sst2",
        ],
    }
)
SIDES = ("trainer", "trainer-compiled", "loop", "loop-compiled", "loop-fast", "loop-trainer")
DEFAULT_SIDES = ("trainer", "trainer-compiled", "loop", "loop-fast")


def flops_per_token(shape: dict, seq_len: int) -> float:
    attention = 12 * shape["layers"] * shape["heads"] * shape["head_dim"] * seq_len if shape.get("layers") else 0
    return 6 * shape["params"] + attention


def cmd_bench(argv) -> int:
    from .checkpoint import unwritable
    from .compare import _run_side, run_child, side_env, take_option
    from .job import build_job
    from .telemetry import PEAK_TFLOPS

    argv = list(argv)
    workload, argv = take_option(argv, "--workload", str, "gpt2-124m")
    sides, argv = take_option(argv, "--sides", str, "trainer,loop-fast")
    steps, argv = take_option(argv, "--steps", int, "100")
    side, argv = take_option(argv, "--_side", str, "loop")
    result_file, argv = take_option(argv, "--_result", str, "FILE")
    if workload is not None:
        if workload not in WORKLOADS:
            raise LoopError(
                f"unknown workload {workload!r}{closest(workload, WORKLOADS)}; choose one of: "
                f"{', '.join(WORKLOADS)}, or pass --config JOB"
            )
        argv = WORKLOADS[workload] + argv  # the command line's own options override the workload's
    argv += ["--max_steps", str(steps or 100), "--disable_tqdm", "true"]
    config, module, task = build_job(argv)
    skip = max(1, min(20, config.max_steps // 5))  # warm-up steps left out of the steady-state rate
    if side is not None:  # a child process: one side
        if side.endswith("-compiled"):
            config.torch_compile = True
        if side == "loop-fast":
            config = dataclasses.replace(config, fast=True)  # the levers are decided in the run (loop/fast.py)
        result = _run_side(side if side == "loop-trainer" else side.split("-")[0], config, module, task, skip)
        with open(result_file, "w") as f:
            json.dump(result, f, default=str)
        return 0
    names = [s.strip() for s in (sides or ",".join(DEFAULT_SIDES)).split(",") if s.strip()]
    for name in names:
        if name not in SIDES:
            raise LoopError(f"unknown side {name!r}{closest(name, SIDES)}; sides are {', '.join(SIDES)}")
    # Under `accelerate launch`/torchrun every rank runs this; each rank's child for a side joins the other ranks'
    # children in one process group (the parent never joins one), and rank 0 writes the report.
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    if problem := unwritable(config.output_dir):  # every rank, so that none waits for one that stopped
        raise LoopError(problem)  # before any side runs, not when the report is written
    rows = []
    os.makedirs(config.output_dir, exist_ok=True)  # the sides' logs and results, then the report
    for i, name in enumerate(names):
        path = os.path.join(config.output_dir, f".bench-{i}-rank{rank}.json")
        env = side_env(i)  # several processes: a rendezvous of the side's children of its own
        # the child takes the same --steps (argv already ends with this process's --max_steps; the child appends its own)
        run_child(
            ["bench", *argv, "--steps", str(steps or 100), "--_side", name, "--_result", path],
            os.path.join(config.output_dir, f"bench-{name}{f'-rank{rank}' if world > 1 else ''}.log"),
            f"{name} side",
            env=env,
            show=rank == 0,
        )
        with open(path) as f:
            got = json.load(f)
        os.remove(path)
        summary, shape = got["summary"], got["shape"]
        curve = [[r["step"], r["loss"]] for r in got.get("history", []) if "loss" in r]
        rate, tokens = summary["steady_steps_per_second"], summary["steady_tokens_per_second"]
        rows_per_step = config.per_device_train_batch_size * config.gradient_accumulation_steps * world  # all ranks
        seq = tokens / rate / rows_per_step if rate else None
        peak = config.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in got["device"]), None)
        flops = flops_per_token(shape, seq) if seq else None
        rows.append(
            {
                "side": name,
                "device": got["device"],
                "ms_per_step": 1000 / rate if rate else None,
                "tokens_per_second": tokens,
                "samples_per_second": rate * rows_per_step if rate else None,
                "mfu": flops * tokens / world / (peak * 1e12) if peak and flops and tokens else None,
                "train_runtime_s": summary["train_runtime_s"],  # all steps, warm-up and compilation included
                "peak_memory_gb": summary["peak_memory_gb"],
                "train_loss": summary["train_loss"],  # Trainer's train_loss: the mean over the whole run
                "last_loss": curve[-1][1] if curve else None,
                "curve": curve,  # the logged losses, by step
                "eval_s": summary.get("eval_runtime_s"),
                "eval_runtimes_s": summary.get("eval_runtimes_s"),
                "features": got.get("features"),
                "fast": got.get("fast"),
                "params": shape["params"],
                "flops_per_token": flops,
                "processes": world,
                "tokens_per_second_per_device": tokens / world if tokens else None,
            }
        )
    if rank != 0:
        return 0
    report = {
        "workload": workload or "job",
        "steps": config.max_steps,
        "warmup_steps_excluded": skip,
        "precision": config.mixed_precision,
        "device": rows[0]["device"],
        "sides": rows,
        "mfu_formula": "(6N + 12*L*H*Q*T) * tokens/s / peak FLOP/s",
        "config": config.to_dict(),
    }
    with open(os.path.join(config.output_dir, "bench.json"), "w") as f:
        json.dump(report, f, indent=1, default=str)
    print(_table(report))
    _plot(os.path.join(config.output_dir, "bench.png"), report)
    print(
        f"report: {os.path.join(config.output_dir, 'bench.json')}, chart: {os.path.join(config.output_dir, 'bench.png')}"
    )
    return 0


def _fmt(v, spec):
    return "-" if v is None else format(v, spec)


def _table(report) -> str:
    head = (
        f"{'side':<18}{'ms/step':>10}{'tokens/s':>14}{'samples/s':>12}{'MFU':>8}{'train s':>9}{'peak GB':>9}"
        f"{'train_loss':>12}{'last loss':>11}{'eval s':>9}"
    )
    world = report["sides"][0].get("processes", 1)
    lines = [
        f"loop bench: {report['workload']} on {world} x {report['device']}, {report['precision']}, "
        f"{report['steps']} steps (first {report['warmup_steps_excluded']} excluded); tokens/s and samples/s are "
        f"for all {world} devices together, MFU and memory per device"
        if world > 1
        else f"loop bench: {report['workload']} on {report['device']}, {report['precision']}, {report['steps']} steps "
        f"(first {report['warmup_steps_excluded']} excluded)",
        head,
        "-" * len(head),
    ]
    for r in report["sides"]:
        lines.append(
            f"{r['side']:<18}{_fmt(r['ms_per_step'], '.1f'):>10}{_fmt(r['tokens_per_second'], ',.0f'):>14}"
            f"{_fmt(r['samples_per_second'], ',.1f'):>12}{_fmt(r['mfu'] and 100 * r['mfu'], '.1f'):>8}"
            f"{_fmt(r.get('train_runtime_s'), '.1f'):>9}{_fmt(r['peak_memory_gb'], '.2f'):>9}"
            f"{_fmt(r['train_loss'], '.4f'):>12}"
            f"{_fmt(r.get('last_loss'), '.4f'):>11}{_fmt(r.get('eval_s'), '.2f'):>9}"
        )
    r = report["sides"][0]
    lines.append(
        f"MFU = {report['mfu_formula']}, N = {r['params']:,} parameters, {_fmt(r['flops_per_token'], '.3g')} "
        "FLOPs per token (MFU in %; '-' where the device's peak is unknown, e.g. a CPU); ms/step, tokens/s "
        "and samples/s leave out the warm-up steps, train s (train_runtime) counts every step, compilation "
        "included"
    )
    for r in report["sides"]:
        if r.get("features"):
            lines.append(f"{r['side']}: " + "; ".join(r["features"]))
    by_side = {r["side"]: r["tokens_per_second"] for r in report["sides"] if r["tokens_per_second"]}
    for ours in ("loop", "loop-compiled", "loop-fast", "loop-trainer"):
        ratios = [
            f"{by_side[ours] / by_side[t]:.2f}x {t}"
            for t in ("trainer", "trainer-compiled")
            if ours in by_side and t in by_side
        ]
        if ratios:
            lines.append(f"{ours} tokens/s: " + ", ".join(ratios))
    return "\n".join(lines)


def _plot(path, report):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # matplotlib is optional (the plot extra)
        return
    fig, ax = plt.subplots(figsize=(6, 3.5))
    names = [r["side"] for r in report["sides"]]
    ax.bar(names, [r["tokens_per_second"] or 0 for r in report["sides"]])
    ax.set(ylabel="tokens/s (steady state)", title=f"{report['workload']} on {report['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
