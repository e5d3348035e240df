"""`loop compare --script train.py [ARGS...]`: an unmodified Trainer script run as written and with
`transformers.Trainer` replaced by `loop.Trainer`, each in a fresh process, and their per-step logs compared.

    loop compare [--trainer_runs N] [--tolerance REL] [--report_dir DIR] --script train.py [ARGS...]

Everything after the script's path goes to the script. In each side's process the script runs as `__main__` (runpy)
after two patches: on the loop's side `transformers.Trainer` is `loop.Trainer` (so `from transformers import
Trainer` and subclasses of it get the loop), and on both sides every Trainer's `output_dir` is moved into the
report folder (`<report_dir>/<side>`), so that the runs never share files; each Trainer's `log_history` is kept when
its `train()` returns. The verdict is that of `loop compare`: per-step loss and learning rate, and the evaluations,
within the tolerance (0 on a CPU) or Trainer's own run-to-run spread with `--trainer_runs 2`. Writes
`<report_dir>/compare.json` and `compare.png`; exits 1 when parity fails.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys

from .errors import LoopError


def cmd_compare_script(argv) -> int:
    from .compare import _diff, _plot, run_child, side_env, take_option

    i = argv.index("--script")
    if i + 1 >= len(argv):
        raise LoopError("--script needs the path of a Python script that trains with transformers.Trainer")
    own, script, script_args = argv[:i], argv[i + 1], argv[i + 2 :]
    side, own = take_option(own, "--_script_side", str, "loop")
    result, own = take_option(own, "--_result", str, "FILE")
    if side is not None:
        return _run_script_side(side, result, script, script_args, own)
    tolerance, own = take_option(own, "--tolerance", float, "0")
    trainer_runs, own = take_option(own, "--trainer_runs", int, "1")
    report_dir, own = take_option(own, "--report_dir", str, "DIR")
    if own:
        raise LoopError(
            f"unexpected option {own[0]!r} before --script; loop compare --script takes --trainer_runs, "
            "--tolerance and --report_dir, and passes everything after the script's path to the script"
        )
    if not os.path.isfile(script):
        raise LoopError(f"--script {script}: no such file")
    out = report_dir or os.path.join("outputs", "compare-" + os.path.splitext(os.path.basename(script))[0])
    os.makedirs(out, exist_ok=True)
    # Under `accelerate launch`/torchrun every rank runs this; each rank's child for a side joins the other ranks'
    # children in one process group of its own (a fresh rendezvous a side, as `loop bench` does), and rank 0 reports.
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    suffix = f"-rank{rank}" if world > 1 else ""
    runs = []
    for k, name in enumerate(["loop"] + ["trainer"] * max(trainer_runs or 1, 1)):
        tag = name if name == "loop" else f"trainer-{k}"
        if rank == 0:  # the side's own folder, from an earlier comparison (its Trainer's output_dir, shared by ranks)
            shutil.rmtree(os.path.join(out, tag), ignore_errors=True)
        path = os.path.join(out, f".{tag}{suffix}.json")
        run_child(
            [
                "compare",
                "--_script_side",
                name,
                "--_result",
                path,
                "--report_dir",
                out,
                "--script",
                script,
                *script_args,
            ],
            os.path.join(out, f"compare-{tag}{suffix}.log"),
            f"{tag} ({script})",
            env=side_env(k),
            show=rank == 0,
        )
        with open(path) as f:
            got = json.load(f)
        os.remove(path)
        if not got:
            raise LoopError(f"{script} trained no Trainer on the {name} side (its train() was never called)")
        runs.append(got[-1])  # the last Trainer the script trained
    if rank != 0:
        return 0
    ours, theirs = runs[0], runs[1:]
    histories = [r["log_history"] for r in theirs]
    spread = max((_diff(histories[0], h)["loss"]["max_rel"] for h in histories[1:]), default=0.0)
    diff = _diff(histories[0], ours["log_history"])
    tolerance = max(tolerance or 0.0, spread)
    # with several processes Trainer's eval_loss depends on the world size (docs/parity.md): reported, not judged
    judged = [diff["loss"]["max_rel"], diff["learning_rate"]["max_rel"]] + ([diff["eval_loss_max_rel"]] * (world == 1))
    ok = (
        not diff["steps_only_in_one"]
        and diff["eval_records"][0] == diff["eval_records"][1]
        and max(judged) <= tolerance
    )
    report = {
        "script": script,
        "script_args": script_args,
        "world_size": world,
        "parity": ok,
        "tolerance_rel": tolerance,
        "trainer_runs": len(theirs),
        "trainer_run_to_run_max_rel_loss_diff": spread,
        "difference": diff,
        "global_step": {"trainer": theirs[0]["global_step"], "loop": ours["global_step"]},
        "histories": {"loop": ours["log_history"], "trainer": histories[0]},
    }
    with open(os.path.join(out, "compare.json"), "w") as f:
        json.dump(report, f, indent=1, default=str)
    _plot(os.path.join(out, "compare.png"), histories[0], ours["log_history"])
    print(
        f"script {script}: {diff['steps_compared']} logged steps compared, Trainer {theirs[0]['global_step']} "
        f"steps, loop {ours['global_step']}"
    )
    print(
        f"per-step loss: max abs diff {diff['loss']['max_abs']:.3g}, max rel diff {diff['loss']['max_rel']:.3g}; "
        f"grad_norm max rel diff {diff['grad_norm']['max_rel']:.3g}; learning_rate max rel diff "
        f"{diff['learning_rate']['max_rel']:.3g}; eval_loss max rel diff {diff['eval_loss_max_rel']:.3g} over "
        f"{diff['eval_records'][0]} evaluations"
        + (f" (not judged: {world} processes, Trainer's eval_loss depends on the world size)" if world > 1 else "")
    )
    print(f"tolerance (rel) {tolerance:.3g}; verdict: {'PARITY' if ok else 'PARITY FAILED'}")
    print(f"report: {os.path.join(out, 'compare.json')}, plot: {os.path.join(out, 'compare.png')}")
    return 0 if ok else 1


def _run_script_side(side, result, script, script_args, own):
    """In the side's own process: patch, run the script as __main__, keep every trained Trainer's log."""
    import runpy

    import transformers

    from .compare import take_option
    from .trainer import Trainer as LoopTrainer

    report_dir, _ = take_option(own, "--report_dir", str, "DIR")
    trained = []
    classes = [LoopTrainer] if side == "loop" else [transformers.Trainer]
    if side == "loop":
        transformers.Trainer = LoopTrainer  # `from transformers import Trainer` in the script gets the loop's
    tag = re.sub(r"-rank\d+$", "", os.path.basename(result)[1:-5])  # .<tag>[-rank<r>].json
    side_dir = os.path.join(report_dir, tag)  # <report_dir>/<loop|trainer-k>, every rank's Trainer the same
    for cls in classes:
        init, train = cls.__init__, cls.train

        def patched_init(self, *a, _init=init, **k):
            args = k.get("args", a[1] if len(a) > 1 else None)
            if args is not None and hasattr(args, "output_dir"):
                args.output_dir = side_dir  # each side in its own folder: the runs never share files
            _init(self, *a, **k)

        def patched_train(self, *a, _train=train, **k):
            out = _train(self, *a, **k)
            trained.append({"log_history": list(self.state.log_history), "global_step": self.state.global_step})
            return out

        cls.__init__, cls.train = patched_init, patched_train
    sys.argv = [script, *script_args]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    try:
        runpy.run_path(script, run_name="__main__")
    finally:
        with open(result, "w") as f:
            json.dump(trained, f, default=str)
    return 0
