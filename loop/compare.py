"""`loop compare`: the same job through transformers.Trainer and through the loop, side by side.

Both start from identical initial weights (checked by hash) and the same data; each side builds the task afresh
under the run's seed, and the task's hooks (compute_loss_func, optimizers, optimizer_cls_and_kwargs, model_init)
go to Trainer and to the loop under the same names. Each side runs in a fresh process
of its own, so neither inherits the other's warm caches (CUDA context, lazy-loaded kernels, cuDNN/cuBLAS plans per
shape). Under `accelerate launch` (or with --in_process) both run in one process, the loop first, so one-time
costs are charged to the loop.
Prints a table, writes `<output_dir>/compare.json` and `<output_dir>/compare.png`, exits 1 if parity fails.

Tolerance on the per-step loss (relative): 0 (bit for bit) on CPU; on a GPU 1e-5 in fp32 and 1e-2 in bf16/fp16
by default (override with --tolerance). With --trainer_runs 2 Trainer runs twice and the tolerance becomes at
least its own run-to-run spread.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

import torch

from . import fast


def _peak_gb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return None


class _StepClock:
    """Wall time from the end of step `skip` to the final train record (after its last sync): steady-state speed,
    without the one-time warm-up (CUDA context, lazy kernel loading, worker start-up) of the first steps."""

    def __init__(self, skip):
        self.skip, self.t0, self.t1, self.steps = skip, None, None, 0
        self.initial_sha = self.model = None

    def begin(self, model):
        """The weights training starts from (after model_init, if any), hashed for the identical-start check."""
        self.model, self.initial_sha = model, _weights_sha(model)

    def step(self, global_step):
        if global_step == self.skip:
            # A CPU-GPU sync point, once per run: the host runs a step or two ahead of the device, and without it the
            # window would also count the warm-up steps' queued work. Trainer's side gets the same sync.
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.t0 = time.perf_counter()
        self.steps = global_step

    def end(self):
        self.t1 = time.perf_counter()

    def rate(self):
        if self.t0 is None or self.t1 is None or self.steps <= self.skip:
            return None
        return (self.steps - self.skip) / (self.t1 - self.t0)


def _clocks(skip):
    from transformers import TrainerCallback

    from .callbacks import Callback

    clock = _StepClock(skip)

    # the clock stops at the final train record (after the last loss sync), before any final model save
    class LoopClock(Callback):
        def on_train_begin(self, run):
            clock.begin(run.unwrapped)

        def on_step_end(self, run):
            clock.step(run.state.global_step)

        def on_log(self, run, record):
            if "train_runtime" in record:
                clock.end()

    class TrainerClock(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kw):
            clock.begin(model)

        def on_step_end(self, args, state, control, **kw):
            clock.step(state.global_step)

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "train_runtime" in logs:
                clock.end()

    return clock, LoopClock(), TrainerClock()


def _summary(history, wall, tokens, steps, device, clock=None):
    final = next((r for r in reversed(history) if "train_runtime" in r), {})
    evals = [r for r in history if any(k.startswith("eval_") and k.endswith("loss") for k in r)]
    eval_runtimes = [r["eval_runtime"] for r in history if "eval_runtime" in r]  # each one: the first warms up
    runtime = final.get("train_runtime", wall)
    steady = clock.rate() if clock is not None else None
    per_step_tokens = tokens / steps if tokens and steps else None
    return {
        "steady_steps_per_second": steady,
        "steady_tokens_per_second": steady * per_step_tokens if steady and per_step_tokens else None,
        "wall_time_s": wall,
        "train_runtime_s": runtime,
        "steps": steps,
        "steps_per_second": steps / runtime if runtime else None,
        "tokens_per_second": tokens / runtime if runtime and tokens else None,
        "peak_memory_gb": _peak_gb(device),
        "train_loss": final.get("train_loss"),
        "eval_runtime_s": sum(eval_runtimes) or None,
        "eval_runtimes_s": eval_runtimes,
        "final_eval": {
            k: v
            for k, v in (evals[-1] if evals else {}).items()
            if k.startswith("eval_") and not k.endswith(("_runtime", "_per_second"))
        },
    }


def _diff(trainer_hist, loop_hist):
    a = {r["step"]: r for r in trainer_hist if "loss" in r}
    b = {r["step"]: r for r in loop_hist if "loss" in r}
    steps = sorted(set(a) & set(b))
    out = {"steps_compared": len(steps), "steps_only_in_one": sorted(set(a) ^ set(b))}
    for key in ("loss", "grad_norm", "learning_rate"):
        d = [abs(a[s][key] - b[s][key]) for s in steps if key in a[s] and key in b[s]]
        r = [abs(a[s][key] - b[s][key]) / max(abs(a[s][key]), 1e-12) for s in steps if key in a[s] and key in b[s]]
        out[key] = {
            "max_abs": max(d, default=0.0),
            "mean_abs": sum(d) / len(d) if d else 0.0,
            "max_rel": max(r, default=0.0),
        }
    ea = [r for r in trainer_hist if "eval_loss" in r]
    eb = [r for r in loop_hist if "eval_loss" in r]
    out["eval_loss_max_rel"] = max(
        (abs(x["eval_loss"] - y["eval_loss"]) / max(abs(x["eval_loss"]), 1e-12) for x, y in zip(ea, eb)), default=0.0
    )
    out["eval_records"] = [len(ea), len(eb)]
    return out


def _plot(path, trainer_hist, loop_hist):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for hist, name, style in ((trainer_hist, "Trainer", "-"), (loop_hist, "loop", "--")):
        rs = [r for r in hist if "loss" in r]
        ax1.plot([r["step"] for r in rs], [r["loss"] for r in rs], style, label=name)
        ax2.plot([r["step"] for r in rs], [r["learning_rate"] for r in rs], style, label=name)
        es = [r for r in hist if "eval_loss" in r]
        if es:
            ax1.plot([r["step"] for r in es], [r["eval_loss"] for r in es], style, marker="o", label=f"{name} eval")
    ax1.set(xlabel="step", ylabel="loss", title="loss")
    ax2.set(xlabel="step", ylabel="learning rate", title="learning rate")
    ax1.legend()
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _weights_sha(model) -> str:
    """A hash of the weights. Under FSDP2 each rank hashes its own shards (DTensors: both sides shard alike)."""
    import hashlib

    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        v = v.to_local() if hasattr(v, "to_local") else v
        h.update(k.encode())
        h.update(v.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


# What of a task's build() Trainer takes under the same name (loop callbacks stay on the loop's side).
_TRAINER_KEYS = (
    "train_dataset",
    "eval_dataset",
    "data_collator",
    "processing_class",
    "compute_metrics",
    "preprocess_logits_for_metrics",
    "compute_loss_func",
    "optimizer_cls_and_kwargs",
    "model_init",
    "optimizers",
)


def _run_side(side, config, module, task, skip):
    """Build the task afresh (same seed: same initial weights, checked by hash) and train one side with it."""
    from transformers import Trainer

    from .errors import LoopError
    from .fit import train
    from .job import build_task

    built = build_task(module, task, config)
    if built.get("optimizer_step") is not None:
        raise LoopError(
            "the task's optimizer_step has no Trainer equivalent, so `loop compare` cannot run it on "
            "Trainer's side; compare without it (build() can read an option of the task to leave it out)"
        )
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    clock, loop_cb, trainer_cb = _clocks(skip)
    start = time.time()
    if side in ("loop", "loop-trainer"):
        extra = list(built.pop("callbacks", None) or [])
        # no final model: Trainer's train() writes none either, and a 1.5B model's is 6 GB of disk and seconds
        # the side folder is compare's and bench's own: a second comparison into the same output_dir replaces it
        ours = dataclasses.replace(
            config, output_dir=os.path.join(config.output_dir, side), save_final_model=False, overwrite_output_dir=True
        )
        if side == "loop":
            result = train(ours, callbacks=extra + [loop_cb], **built)
            history, steps, plan_ = result.log_history, result.global_step, result.fast
        else:  # the same run through loop.Trainer, the drop-in face (bench: is the face free?)
            from .trainer import Trainer as LoopTrainer

            kwargs = {k: v for k, v in built.items() if k in _TRAINER_KEYS and v is not None}
            trainer = LoopTrainer(model=built.get("model"), args=ours, callbacks=extra + [loop_cb], **kwargs)
            trainer.train()
            history, steps, plan_ = trainer.state.log_history, trainer.state.global_step, trainer.fast
        model = clock.model
        features = config.loop_features() + plan_.report()
        plan = plan_.to_dict()
    else:
        kwargs = {k: v for k, v in built.items() if k in _TRAINER_KEYS and v is not None}
        trainer = Trainer(
            model=built.get("model"),
            # under `fast`, Trainer is compiled and given the same optimizer (fast.trainer_settings)
            args=config.to_training_arguments(
                output_dir=os.path.join(config.output_dir, "trainer"), **fast.trainer_settings(config)
            ),
            callbacks=[trainer_cb],
            **kwargs,
        )
        trainer.train()
        history, steps, model = trainer.state.log_history, trainer.state.global_step, trainer.model
        features, plan = (["torch_compile"] if trainer.args.torch_compile else []), None
    wall = time.time() - start
    device = next(model.parameters()).device
    tokens = _tokens_of(built, config, steps)
    return {
        "history": history,
        "summary": _summary(history, wall, tokens, steps, device, clock),
        "initial_weights_sha": clock.initial_sha,
        "shape": model_shape(model),
        "features": features,
        "fast": plan,  # every lever, on or off and why (loop side)
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
    }


def model_shape(model) -> dict:
    """What the FLOP count needs: all parameters N, and layers L, heads H, head size Q (None if the config lacks them)."""
    from .telemetry import parameter_count

    cfg = getattr(model, "config", None)
    get = lambda *names: next((getattr(cfg, n) for n in names if getattr(cfg, n, None) is not None), None)  # noqa: E731
    layers, heads, hidden = (
        get("n_layer", "num_hidden_layers"),
        get("n_head", "num_attention_heads"),
        get("n_embd", "hidden_size"),
    )
    return {
        "params": parameter_count(model),
        "layers": layers,
        "heads": heads,
        "head_dim": hidden // heads if hidden and heads else None,
    }


def take_option(argv, flag, kind, example):
    """(value of `flag VALUE` or None, argv without them); one clear line if the value is missing or malformed."""
    from .errors import LoopError

    if flag not in argv:
        return None, argv
    i = argv.index(flag)
    try:
        value = kind(argv[i + 1])
    except (IndexError, ValueError):
        raise LoopError(f"{flag} needs a {kind.__name__}, e.g. {flag} {example}") from None
    return value, argv[:i] + argv[i + 2 :]


def side_env(index: int):
    """The environment of a side's child under `accelerate launch`/torchrun (None with one process): the children of
    every rank for side `index` meet in a process group of their own, on a fresh rendezvous that rank 0's child hosts
    on its own port (not torchrun's store)."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return None
    port = int(os.environ.get("MASTER_PORT", "29500")) + 1 + index
    return dict(os.environ, TORCHELASTIC_USE_AGENT_STORE="False", MASTER_PORT=str(port))


def run_child(args, log_path, what, env=None, show=True) -> None:
    """`python -m loop ARGS` in a fresh process with its output (progress bars, Trainer's printed records, warnings)
    in log_path, so that the terminal shows a line a side and then the report. A side that fails: the last lines of
    its log, then one line naming it."""
    import subprocess
    import sys

    from .errors import LoopError

    if show:
        print(f"{what}: running (output in {log_path})", flush=True)
    start = time.time()
    with open(log_path, "w") as log:
        proc = subprocess.run([sys.executable, "-m", "loop", *args], stdout=log, stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0:
        with open(log_path, errors="replace") as log:
            print("\n".join(log.read().replace("\r", "\n").splitlines()[-15:]), file=sys.stderr)
        raise LoopError(f"the {what} failed (exit {proc.returncode}); its output is in {log_path}, last lines above")
    if show:
        print(f"{what}: done in {time.time() - start:.1f} s", flush=True)


def cmd_compare(argv) -> int:
    from .checkpoint import unwritable

    if "--script" in argv:  # an unmodified Trainer script under both Trainers (compare_script.py)
        from .compare_script import cmd_compare_script

        return cmd_compare_script(argv)
    from .errors import LoopError
    from .job import build_job

    tolerance, argv = take_option(argv, "--tolerance", float, "1e-5")
    trainer_runs, argv = take_option(argv, "--trainer_runs", int, "2")
    trainer_runs = trainer_runs or 1
    side, argv = take_option(argv, "--_side", str, "loop")
    side_out, argv = take_option(argv, "--_result", str, "FILE")
    in_process = "--in_process" in argv
    argv = [a for a in argv if a != "--in_process"]
    config, module, task = build_job(argv)
    out = config.output_dir
    if side is None and (problem := unwritable(out)):  # every rank, so that none waits for one that stopped
        raise LoopError(problem)  # before any side runs, not when the report is written
    total = config.max_steps if config.max_steps > 0 else None
    skip = max(1, min(20, (total or 100) // 10))  # steps excluded from the steady-state rate
    if side is not None:  # a child process: one side, result to a file
        result = _run_side(side, config, module, task, skip)
        with open(side_out, "w") as f:
            json.dump(result, f, default=str)
        return 0

    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    runs = []
    if in_process or distributed:
        # one process: the loop first, so one-time per-process costs (CUDA context, kernel and cuDNN/cuBLAS
        # plan caches) are charged to the loop, not to Trainer. Each side builds the task afresh.
        for name in ["loop"] + ["trainer"] * trainer_runs:
            runs.append(_run_side(name, config, module, task, skip))
        mode = "one process, loop first"
    else:
        # each side in a fresh process: neither inherits the other's warm caches
        os.makedirs(out, exist_ok=True)
        for i, name in enumerate(["loop"] + ["trainer"] * trainer_runs):
            path = os.path.join(out, f".side-{i}.json")
            label = name if name == "loop" else f"trainer run {i} of {trainer_runs}"
            run_child(
                ["compare", *argv, "--_side", name, "--_result", path],
                os.path.join(out, f"compare-{name}{'' if name == 'loop' else f'-{i}'}.log"),
                label,
            )
            with open(path) as f:
                runs.append(json.load(f))
            os.remove(path)
        mode = "separate processes"
    loop_run, trainer_run_list = runs[0], runs[1:]
    histories = [r["history"] for r in trainer_run_list]
    spread = max((_diff(histories[0], h)["loss"]["max_rel"] for h in histories[1:]), default=None)

    # ------------------------------------------------------------------ verdict, table, files
    on_gpu = loop_run["device"] != "cpu"
    if tolerance is None:
        tolerance = 0.0 if not on_gpu else (1e-5 if config.mixed_precision == "no" else 1e-2)
    if spread is not None:
        tolerance = max(tolerance, spread)
    diff = _diff(histories[0], loop_run["history"])
    same_init = len({r["initial_weights_sha"] for r in runs}) == 1
    # with several processes Trainer's eval_loss depends on the world size and the loop's does not (docs/parity.md: deliberate
    # differences), so it is reported but left out of the verdict there
    world = int(os.environ.get("WORLD_SIZE", "1"))
    judged = [diff["loss"]["max_rel"], diff["learning_rate"]["max_rel"]] + (
        [diff["eval_loss_max_rel"]] if world == 1 else []
    )
    ok = (
        same_init
        and not diff["steps_only_in_one"]
        and diff["eval_records"][0] == diff["eval_records"][1]
        and max(judged) <= tolerance
    )
    report = {
        "device": loop_run["device"],
        "precision": config.mixed_precision,
        "world_size": int(os.environ.get("WORLD_SIZE", "1")),
        "tolerance_rel": tolerance,
        "parity": ok,
        "identical_initial_weights": same_init,
        "mode": mode,
        "trainer_runs": trainer_runs,
        "trainer_run_to_run_max_rel_loss_diff": spread,
        "trainer": trainer_run_list[0]["summary"],
        "loop": loop_run["summary"],
        "difference": diff,
        "loop_only_features_on": loop_run["features"],
        "fast": loop_run.get("fast"),
        "steady_skip": skip,
        "transformers": __import__("transformers").__version__,
        "torch": torch.__version__,
        "config": config.to_dict(),
        # per-step (step, loss, grad_norm) of every run, to see where and how far the curves part
        "curves": {
            name: [[r["step"], r["loss"], r.get("grad_norm")] for r in run["history"] if "loss" in r]
            for name, run in [("loop", loop_run)] + [(f"trainer{i + 1}", r) for i, r in enumerate(trainer_run_list)]
        },
    }
    if int(os.environ.get("RANK", "0")) == 0:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "compare.json"), "w") as f:
            json.dump(report, f, indent=1, default=str)
        _plot(os.path.join(out, "compare.png"), histories[0], loop_run["history"])
        print(table(report))
        print(f"report: {os.path.join(out, 'compare.json')}, plot: {os.path.join(out, 'compare.png')}")
    return 0 if ok else 1


def _tokens_of(built, config, steps):
    """Input tokens processed: the same for both sides (same data, same steps), counted from the data."""
    ds = built["train_dataset"]
    try:
        lengths = [len(ds[i]["input_ids"]) for i in range(min(len(ds), 256))]
    except (KeyError, TypeError, IndexError):
        return None
    per_sample = sum(lengths) / len(lengths)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return per_sample * steps * config.per_device_train_batch_size * config.gradient_accumulation_steps * world


def _fmt(v):
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def table(report) -> str:
    t, l, d = report["trainer"], report["loop"], report["difference"]
    rows = [("", "Trainer", "loop")]
    for key in (
        "steps",
        "train_loss",
        "steady_steps_per_second",
        "steady_tokens_per_second",
        "steps_per_second",
        "tokens_per_second",
        "peak_memory_gb",
        "train_runtime_s",
        "eval_runtime_s",
        "wall_time_s",
    ):
        if key != "eval_runtime_s" or t.get(key) or l.get(key):
            rows.append((key, _fmt(t.get(key)), _fmt(l.get(key))))
    for key in sorted(set(t["final_eval"]) | set(l["final_eval"])):
        rows.append((key, _fmt(t["final_eval"].get(key)), _fmt(l["final_eval"].get(key))))
    w = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = [" | ".join(c.ljust(w[i]) for i, c in enumerate(r)) for r in rows]
    lines.insert(1, "-+-".join("-" * x for x in w))
    lines += [
        "",
        f"per-step loss: max abs diff {d['loss']['max_abs']:.3g}, mean abs diff {d['loss']['mean_abs']:.3g}, "
        f"max rel diff {d['loss']['max_rel']:.3g} over {d['steps_compared']} logged steps",
        f"grad_norm max rel diff {d['grad_norm']['max_rel']:.3g}; learning_rate max rel diff "
        f"{d['learning_rate']['max_rel']:.3g}; eval_loss max rel diff {d['eval_loss_max_rel']:.3g}",
        f"Trainer vs Trainer ({report['trainer_runs']} runs) max rel loss diff: "
        f"{_fmt(report['trainer_run_to_run_max_rel_loss_diff'])}",
        f"device {report['device']}, precision {report['precision']}, {report['world_size']} process(es), "
        f"tolerance (rel) {report['tolerance_rel']:g}"
        + (
            "; eval_loss not judged: with several processes Trainer's depends on the world size"
            if report["world_size"] > 1
            else ""
        ),
        f"loop-only features on: {', '.join(report['loop_only_features_on']) or 'none'}",
        f"steady_*: after the first {report['steady_skip']} steps (warm-up excluded); {report['mode']}; "
        f"identical initial weights: {report['identical_initial_weights']}",
        f"verdict: {'PARITY' if report['parity'] else 'PARITY FAILED'}",
    ]
    return "\n".join(lines)
