"""Checkpoints that survive anything (timm CheckpointSaver-style: write, then rename; keep best and last apart).

What `<output_dir>/checkpoint-<global_step>/` holds is the table PARTS below: one class a stateful part, each naming
and writing its own files, walked in the same order by save() and load(). Besides the parts' files, `COMPLETE` is
written last: the step and every file's size and crc32. A folder without it, or whose files differ from it (truncated
copy, bit rot), is never resumed from nor counted.

A checkpoint is written to `.tmp-checkpoint-<step>` and renamed into place only once complete, so a kill
at any moment leaves either the previous set of checkpoints or the new one, never a half-written one that
looks whole. Under FSDP/DeepSpeed the sharded model/optimizer state goes through accelerate's save_state.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import shutil
import time
import warnings
import zlib

import numpy as np
import torch

from . import zero
from .errors import LoopError

MARKER = "COMPLETE"
PREFIX = "checkpoint-"
_NAME = re.compile(r"^checkpoint-(\d+)$")


# ---------------------------------------------------------------------------------------------- RNG
def rng_state(distributed: bool = False) -> dict:
    """The random streams, with Trainer's keys: `cuda` is this device's state alone, or every device's (a list) in a
    distributed run, as Trainer's _save_rng_state writes it."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all() if distributed else torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        torch.cuda.set_rng_state_all(cuda) if isinstance(cuda, (list, tuple)) else torch.cuda.set_rng_state(cuda)


# ---------------------------------------------------------------------------------------------- manifest
def _crc32(path: str) -> str:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 23):
            crc = zlib.crc32(chunk, crc)
    return f"{crc:08x}"


def manifest(folder: str) -> dict:
    """{relative path: [size, crc32]} of every file in the folder (subfolders included), the marker excepted."""
    files = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            rel = os.path.relpath(path, folder)
            if rel != MARKER:
                files[rel] = [os.path.getsize(path), _crc32(path)]
    return dict(sorted(files.items()))


def _read_manifest(path: str):
    """The files the marker lists, or None for a checkpoint written before manifests (a bare step number)."""
    try:
        with open(os.path.join(path, MARKER)) as f:
            data = json.load(f)
    except ValueError:
        return None
    return data.get("files") if isinstance(data, dict) else None


def damage(path: str, checksums: bool = False):
    """What is wrong with a checkpoint folder (one phrase), or None if it is whole. Sizes are always compared with the
    manifest (cheap); checksums only when asked (reads every byte: done before resuming). A folder Trainer wrote has
    no manifest: its own rule applies (trainer_format.problem)."""
    from . import trainer_format

    if trainer_format.is_trainer_checkpoint(path):
        return trainer_format.problem(path)
    if not os.path.isfile(os.path.join(path, MARKER)) or not os.path.isfile(os.path.join(path, "loop_state.json")):
        return f"incomplete or not a loop checkpoint (no {MARKER} marker)"
    try:
        files = _read_manifest(path)
        with open(os.path.join(path, "loop_state.json")) as f:
            json.load(f)
    except (OSError, ValueError):
        return "its loop_state.json or manifest is unreadable"
    resharded = None
    if not os.path.isfile(os.path.join(path, "model.safetensors")):
        # weights re-sharded after saving (an index and its shards in place of model.safetensors): whole when every
        # shard is there; the shards have no manifest entry, so only their presence is checked
        shards = weight_files(path)
        resharded = shards is not None and shards != ["pytorch_model.bin"]
    for rel, (size, crc) in (files or {}).items():
        full = os.path.join(path, rel)
        if rel == "model.safetensors" and resharded:
            continue
        if not os.path.isfile(full):
            return f"{rel} is missing"
        if os.path.getsize(full) != size:
            return f"{rel} has {os.path.getsize(full)} bytes, its manifest says {size} (truncated?)"
        if checksums and _crc32(full) != crc:
            return f"{rel} does not match its checksum (corrupted)"
    return None


# ---------------------------------------------------------------------------------------------- discovery
def is_complete(path: str) -> bool:
    return damage(path) is None


def list_checkpoints(output_dir: str, warn: bool = False) -> list[tuple[int, str]]:
    """Whole checkpoints as (step, path), oldest first. Partial, junk or damaged folders (a file whose size differs
    from the manifest) are skipped, with a warning naming them when `warn`; rotation never counts them."""
    found = []
    if not os.path.isdir(output_dir):
        return found
    for name in os.listdir(output_dir):
        m = _NAME.match(name)
        path = os.path.join(output_dir, name)
        if not m or not os.path.isdir(path):
            continue
        problem = damage(path)
        if problem:
            if warn:
                warnings.warn(f"skipping {path}: {problem}")
            continue
        found.append((int(m.group(1)), path))
    return sorted(found)


def _none(value) -> bool:
    return value in (None, False, "", "none", "false", "False")


def _latest(value) -> bool:
    return value is True or str(value).lower() in ("true", "latest")


@dataclasses.dataclass(frozen=True)
class Pending:
    """A resume value checked cheaply before the run is built (precheck_resume). Its checksums, which read every byte,
    are read once the ranks can talk (verify_resume): by one process per filesystem, with one verdict for all."""

    value: object


def precheck_resume(value, output_dir: str, save_on_each_node: bool = False):
    """PATH | True | 'latest' | None -> Pending or None, or one clear line if there is nothing to resume (sizes are
    compared with the manifests here, checksums later). With save_on_each_node nothing is checked yet: one node alone
    could not tell the others that it cannot resume."""
    if _none(value):
        return None
    if not save_on_each_node:
        if _latest(value) and not list_checkpoints(output_dir):
            _choose(value, output_dir)  # raises the no-checkpoint line (with the warnings naming what was skipped)
        if not _latest(value) and (problem := _path_problem(str(value), checksums=False)):
            raise LoopError(_cannot(str(value), problem))
    return Pending(value)


def verify_resume(acc, pending: Pending, output_dir: str, save_on_each_node: bool) -> str:
    """The checkpoint every rank resumes from. Only rank 0 reads the checksums (every rank reading them would read the
    checkpoint once per GPU), or with save_on_each_node each node's first process its own copies; the verdict is
    gathered, so every rank resumes from the same step or stops with the same line. Collective: every rank calls it."""
    from accelerate.utils import gather_object

    checker = acc.is_local_main_process if save_on_each_node else acc.is_main_process
    return _choose(
        pending.value,
        output_dir,
        checker,
        lambda x: gather_object([x]) if acc.num_processes > 1 else [x],
        save_on_each_node,
    )


def resolve_resume(value, output_dir: str):
    """PATH | True | 'latest' | None -> a checkpoint path or None, in one process; a clear error if there is none.
    'latest' takes the newest checkpoint whose every file matches its manifest's size and checksum."""
    return None if _none(value) else _choose(value, output_dir)


def _choose(value, output_dir: str, checker: bool = True, everyone=lambda x: [x], each_node: bool = False) -> str:
    """Resolve `value` where `checker` processes read the files and `everyone(x)` lists every process's x."""
    if not _latest(value):
        path = str(value)
        problems = everyone(_path_problem(path, checksums=True) if checker else None)
        if bad := [(rank, p) for rank, p in enumerate(problems) if p]:
            raise LoopError(_cannot(path, bad[0][1], f" on every node: on process {bad[0][0]}" if each_node else ":"))
        return path
    whole = [step for step, _ in list_checkpoints(output_dir, warn=True)] if checker else None
    common = set.intersection(*(set(steps) for steps in everyone(whole) if steps is not None))
    for step in sorted(common, reverse=True):
        path = os.path.join(output_dir, f"{PREFIX}{step}")
        problem = damage(path, checksums=True) if checker else None
        if problem:
            warnings.warn(f"skipping {path}: {problem}; trying the previous checkpoint")
        if not any(everyone(problem)):
            if checker and each_node and step != whole[-1]:
                warnings.warn(
                    f"resuming from {path}, the newest checkpoint whole on every node (this node also has "
                    f"{', '.join(f'{PREFIX}{s}' for s in whole if s > step)})"
                )
            return path
    raise LoopError(  # Trainer's words first: code written for Trainer's message still finds it
        f"resume_from_checkpoint={value!r}: No valid checkpoint found in output directory ({output_dir}): no "
        f"complete checkpoint in {output_dir}"
        f"{' is whole on every node' if each_node else ''}; train without --resume_from_checkpoint or "
        "point it at a checkpoint folder"
    )


def _path_problem(path: str, checksums: bool):
    return "it does not exist" if not os.path.isdir(path) else damage(path, checksums=checksums)


def _cannot(path: str, problem: str, where: str = ":") -> str:
    if problem == "it does not exist":  # Trainer's words
        return (
            f"resume_from_checkpoint: Can't find a valid checkpoint at {path}: it does not exist; pass another "
            "checkpoint, or 'latest' to take the newest whole one"
        )
    return (
        f"resume_from_checkpoint: {path} cannot be resumed{where} {problem}; pass another checkpoint, or 'latest' "
        "to take the newest whole one"
    )


STALE = (".tmp-checkpoint-", ".old-checkpoint-", ".node-probe-", ".write-probe-")  # what a killed save or start leaves


def clean_stale(output_dir: str):
    """Remove temporary folders left by a save that was killed."""
    if os.path.isdir(output_dir):
        for name in os.listdir(output_dir):
            if name.startswith(STALE) or name == ".tmp-final":
                shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)


def unwritable(folder: str):
    """Why `folder` cannot be made or written in (one phrase with the fix), or None. A probe file, removed at once,
    written in the folder or, while it does not exist, in its nearest existing parent (where it would be made): a
    run that writes nothing leaves no folder, as Trainer's runs."""
    fix = "choose a folder you can write to with --output_dir"
    where = os.path.abspath(folder)
    while not os.path.exists(where) and os.path.dirname(where) != where:
        where = os.path.dirname(where)
    if not os.path.isdir(where):  # the folder, or what would hold it, is a file
        return f"output_dir {folder} cannot be written (Not a directory); {fix}"
    try:
        probe = os.path.join(where, f".write-probe-{os.getpid()}")
        open(probe, "w").close()
        os.remove(probe)
    except OSError as e:
        return f"output_dir {folder} cannot be written ({e.strerror or e}); {fix}"
    return None


def writes(acc, config) -> bool:
    """Whether this process writes checkpoints and the final model: rank 0 into the one shared output_dir, or with
    save_on_each_node each node's first process into its own (nodes without a shared filesystem; Trainer's rule)."""
    return acc.is_local_main_process if config.save_on_each_node else acc.is_main_process


def previous_run(config) -> list[str]:
    """What another run left in output_dir: its records, its checkpoint folders (whole or not), its final model."""
    out = config.output_dir
    if not os.path.isdir(out):
        return []
    names = sorted(os.listdir(out))
    metrics = _records_file(config)
    left = [os.path.basename(metrics)] if os.path.isfile(metrics) and os.path.getsize(metrics) > 0 else []
    left += [n for n in names if _NAME.match(n) and os.path.isdir(os.path.join(out, n))]
    left += [n for n in FINAL_MODEL if n in names]
    return left


def _records_file(config) -> str:
    """Where a run's records are (another run's too, when this one writes none: metrics_file None)."""
    return os.path.join(config.output_dir, config.metrics_file or "metrics.jsonl")


FINAL_MODEL = ("model.safetensors", "ema")  # what makes a folder look like a finished run's


def new_run_problem(config) -> str | None:
    """A new run never mixes its records and checkpoints with another run's (and `latest` never resumes the other
    run's newest checkpoint): refused, or with overwrite_output_dir those are deleted first."""
    left = previous_run(config)
    if not left:
        return None
    if config.reuse_output_dir:  # Trainer's way: write over what has the same names; the records are kept apart
        metrics = _records_file(config)
        if os.path.basename(metrics) in left:
            stem, ext = os.path.splitext(metrics)
            os.replace(metrics, f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}{ext}")
        return None
    if config.overwrite_output_dir:
        for name in left:
            path = os.path.join(config.output_dir, name)
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
        return None
    shown = ", ".join(left[:4]) + (f" and {len(left) - 4} more" if len(left) > 4 else "")
    return (
        f"output_dir {config.output_dir} holds another run ({shown}); continue it with --resume_from_checkpoint "
        "latest, choose another --output_dir, or pass --overwrite_output_dir true to delete those and start over"
    )


def check_output_dir(config, acc, resuming: bool = False):
    """Before anything is built: the processes that write (ckpt.writes) can create output_dir and write in it, a new
    run does not land on another run's files (new_run_problem), and with save_on_each_node it is not one folder shared
    by the nodes. Refused in one line on every rank at once. Collective: every rank calls it."""
    from accelerate.utils import broadcast_object_list, gather_object

    problem = None
    if writes(acc, config):
        problem = unwritable(config.output_dir) or (None if resuming else new_run_problem(config))
    if acc.num_processes > 1:  # the same verdict on every rank, so that none is left waiting in a collective
        problem = next((p for p in gather_object([problem]) if p), None)
    if problem:
        raise LoopError(problem)
    if not config.save_on_each_node:
        return
    if _sharded(acc):
        raise LoopError(
            "save_on_each_node under FSDP/DeepSpeed: their sharded checkpoints are one set written by every "
            "rank with one index, which needs an output_dir all nodes share; unset save_on_each_node"
        )
    if acc.num_processes == 1:
        return
    # each node's writer leaves a probe named for this run; seeing another node's probe means the folder is shared
    prefix = f".node-probe-{broadcast_object_list([os.urandom(4).hex()])[0]}-"
    probe = os.path.join(config.output_dir, f"{prefix}{acc.process_index}")
    if acc.is_local_main_process:
        os.makedirs(config.output_dir, exist_ok=True)
        open(probe, "w").close()
    acc.wait_for_everyone()
    sees_another = acc.is_local_main_process and any(
        n.startswith(prefix) and n != os.path.basename(probe) for n in os.listdir(config.output_dir)
    )
    shared = any(gather_object([sees_another]))
    acc.wait_for_everyone()
    if acc.is_local_main_process:
        os.remove(probe)
    if shared:
        raise LoopError(
            f"save_on_each_node: {config.output_dir} is shared between nodes (one node sees another's "
            "files), so every node would write the same checkpoints over each other; unset "
            "save_on_each_node (rank 0 then writes for all)"
        )


# ---------------------------------------------------------------------------------------------- saving
def _fsync_dir(path):
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def _sharded(accelerator) -> bool:
    return accelerator.distributed_type.name in ("FSDP", "DEEPSPEED")


def ema_file_name(ema, rank: int) -> str:
    """ema.safetensors, or under FSDP2 one file of shards per rank (resume needs the same world size)."""
    return f"ema_shards_{rank}.safetensors" if ema.sharded else "ema.safetensors"


def save(run) -> str:
    """Write a complete checkpoint for the current step; return its path. Collective: every rank calls it."""
    acc, cfg, state = run.accelerator, run.config, run.state
    final = os.path.join(cfg.output_dir, f"{PREFIX}{state.global_step}")
    tmp = os.path.join(cfg.output_dir, f".tmp-{PREFIX}{state.global_step}")
    run.telemetry.flush()  # flos and token counts into the state before it is written (collective)
    writer = writes(acc, cfg)
    try:
        if writer:
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
        acc.wait_for_everyone()
        for part in PARTS:  # the same table load() walks
            part.save(run, tmp, writer)
        acc.wait_for_everyone()
        if writer:
            files = manifest(tmp)  # every file with its size and checksum: resume verifies them
            with open(os.path.join(tmp, MARKER), "w") as f:
                json.dump({"step": state.global_step, "files": files}, f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            _fsync_dir(tmp)
            if os.path.exists(final):  # re-saving a step (after a resume): swap atomically, then drop the old
                old = os.path.join(cfg.output_dir, f".old-{PREFIX}{state.global_step}")
                os.replace(final, old)
                os.replace(tmp, final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, final)
            _fsync_dir(cfg.output_dir)
        acc.wait_for_everyone()
    except OSError as e:
        if writer:
            shutil.rmtree(tmp, ignore_errors=True)
        raise LoopError(
            f"saving checkpoint {final} failed ({e.strerror or e}); earlier checkpoints are intact - "
            "free disk space or change output_dir, then resume with --resume_from_checkpoint latest"
        ) from None
    return final


def rotate(output_dir: str, limit, keep: tuple = ()):
    """Delete the oldest complete checkpoints beyond `limit`, never one in `keep` (best) nor the newest."""
    if not limit:
        return []
    found = list_checkpoints(output_dir)
    if not found:
        return []
    protected = {os.path.abspath(p) for p in keep if p} | {os.path.abspath(found[-1][1])}
    removable = [p for _, p in found if os.path.abspath(p) not in protected]
    excess = len(found) - max(limit, len(protected))
    deleted = removable[: max(excess, 0)]
    for path in deleted:
        shutil.rmtree(path, ignore_errors=True)
    return deleted


def save_weights(state_dict: dict, path: str):
    """Unwrapped, de-aliased (tied weights stored once, under their first name), contiguous safetensors."""
    from safetensors.torch import save_file

    weights, seen = {}, set()
    for k, v in strip_prefixes(state_dict).items():
        key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape))
        if key not in seen:
            seen.add(key)
            weights[k] = v
    save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()}, path, metadata={"format": "pt"})


def strip_prefixes(state_dict: dict) -> dict:
    out = {}
    for k, v in state_dict.items():
        for p in ("_orig_mod.", "module."):
            while k.startswith(p):
                k = k[len(p) :]
        out[k.replace("._orig_mod.", ".")] = v
    return out


# ---------------------------------------------------------------------------------------------- loading
WEIGHTS_INDEX = "model.safetensors.index.json"


def weight_files(path: str):
    """The files that hold a folder's weights: model.safetensors, or the shards its index names (as save_pretrained
    writes a large model, or as weights are re-sharded after saving), or Trainer's older pytorch_model.bin. None when
    they are not all there."""
    if os.path.isfile(os.path.join(path, "model.safetensors")):
        return ["model.safetensors"]
    try:
        with open(os.path.join(path, WEIGHTS_INDEX)) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        shards = None
    if shards is not None:
        return shards if all(os.path.isfile(os.path.join(path, s)) for s in shards) else None
    return ["pytorch_model.bin"] if os.path.isfile(os.path.join(path, "pytorch_model.bin")) else None


def read_weights(path: str) -> dict:
    """A folder's weights as one state dict, whichever form weight_files found."""
    import torch
    from safetensors.torch import load_file

    weights = {}
    for name in weight_files(path) or ["model.safetensors"]:  # none there: the error names the file looked for
        full = os.path.join(path, name)
        weights.update(load_file(full) if name.endswith(".safetensors") else torch.load(full, weights_only=True))
    return weights


def load_weights(model, path: str):
    """Load a folder's weights (weight_files) into an unwrapped model; tied weights saved once are fine."""
    weights = read_weights(path)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    tied = {k for k in missing if _is_tied(model, k, weights)}
    if unexpected or set(missing) - tied:
        raise LoopError(
            f"checkpoint {path} does not fit the model (missing {sorted(set(missing) - tied)[:3]}, "
            f"unexpected {sorted(unexpected)[:3]}); resume with the model it was made with"
        )


def _is_tied(model, key, weights) -> bool:
    params = dict(model.named_parameters(remove_duplicate=False))
    t = params.get(key)
    return t is not None and any(params.get(k) is not None and params[k].data_ptr() == t.data_ptr() for k in weights)


def load(run, path: str):
    """Restore every part of the run from `path` (the table save() writes). The RNG is handed to the loop as
    run.saved_rng: it is set at the data position, not here (fit._epoch_batches)."""
    for part in PARTS:
        part.load(run, path)


# ---------------------------------------------------------------------------------------------- the run's state
# What a checkpoint holds: one table of stateful parts, each writing and reading its own files, walked in the same
# order by save() and load(). What is fixed after build() (the model's shape, the plan, the data) is not here; what
# changes every step is. Resume is the geometry check (fit.resume) plus load().
def _path(folder, name):
    return os.path.join(folder, name)


def _torch_load(path, **kw):
    return torch.load(path, weights_only=False, **kw)


class ModelAndOptimizer:
    """model.safetensors (unwrapped: no module./_orig_mod. prefixes; tied weights stored once) and optimizer.pt; under
    FSDP/DeepSpeed both sharded, through accelerate's save_state/load_state (which also carries the fp16 scaler there);
    with sharded_optimizer each rank's optimizer_shard_<rank>.pt instead of optimizer.pt (loop/zero.py).
    save_only_model: the weights alone."""

    def save(self, run, folder, writer):
        acc, cfg = run.accelerator, run.config
        if _sharded(acc) and not cfg.save_only_model:
            acc.save_state(folder)  # collective
            return
        weights = acc.get_state_dict(run.model)  # collective; unwrapped: no module./_orig_mod. prefixes
        if run.sharded is not None and not cfg.save_only_model:  # each rank its own shard of the optimizer
            torch.save(run.sharded.state_dict(), _path(folder, zero.file_name(acc.process_index)))
        if writer:
            save_weights(weights, _path(folder, "model.safetensors"))
            if not cfg.save_only_model and run.sharded is None:
                torch.save(run.optimizer.state_dict(), _path(folder, "optimizer.pt"))

    def load(self, run, folder):
        acc = run.accelerator
        if _sharded(acc) and not os.path.exists(_path(folder, "optimizer.pt")):  # written by accelerate save_state
            acc.load_state(folder)
            return
        load_weights(acc.unwrap_model(run.model, keep_torch_compile=False), folder)
        if run.sharded is not None:
            shard = _path(folder, zero.file_name(acc.process_index))
            if not os.path.exists(shard):
                raise LoopError(
                    f"{folder} holds no sharded optimizer state for rank {acc.process_index} ({os.path.basename(shard)}); "
                    "resume it with the settings it was written with (sharded_optimizer, number of processes)"
                )
            run.sharded.load_state_dict(_torch_load(shard, map_location="cpu"), folder)
            return
        if os.path.exists(_path(folder, zero.file_name(0))):
            raise LoopError(
                f"{folder} holds an optimizer sharded over the processes (sharded_optimizer); resume it with "
                "sharded_optimizer true and the same number of processes"
            )
        if not os.path.exists(_path(folder, "optimizer.pt")):
            raise LoopError(
                f"{folder} holds only the model (save_only_model); it can initialise a new run but not resume one"
            )
        run.optimizer.load_state_dict(_torch_load(_path(folder, "optimizer.pt"), map_location="cpu"))


class Scheduler:
    """scheduler.pt (not with save_only_model)."""

    def save(self, run, folder, writer):
        if writer and not run.config.save_only_model:
            torch.save(run.scheduler.state_dict(), _path(folder, "scheduler.pt"))

    def load(self, run, folder):
        if os.path.exists(_path(folder, "scheduler.pt")):
            run.scheduler.load_state_dict(_torch_load(_path(folder, "scheduler.pt")))


class Scaler:
    """scaler.pt: fp16's loss scaler (unsharded runs; accelerate's save_state carries it under FSDP/DeepSpeed)."""

    def save(self, run, folder, writer):
        acc = run.accelerator
        if writer and acc.scaler is not None and not run.config.save_only_model and not _sharded(acc):
            torch.save(acc.scaler.state_dict(), _path(folder, "scaler.pt"))

    def load(self, run, folder):
        acc = run.accelerator
        if acc.scaler is not None and os.path.exists(_path(folder, "scaler.pt")) and not _sharded(acc):
            acc.scaler.load_state_dict(_torch_load(_path(folder, "scaler.pt")))


class EMAWeights:
    """ema.safetensors: the whole EMA from the writing process; under FSDP2 ema_shards_<rank>.safetensors, each rank's
    own shards (resume then needs the same world size)."""

    def save(self, run, folder, writer):
        if run.ema is not None and (run.ema.sharded or writer):
            from safetensors.torch import save_file

            name = ema_file_name(run.ema, run.accelerator.process_index)
            save_file({k: v.contiguous() for k, v in run.ema.state_dict().items()}, _path(folder, name))

    def load(self, run, folder):
        if run.ema is None:
            return
        ema_file = _path(folder, ema_file_name(run.ema, run.accelerator.process_index))
        if os.path.exists(ema_file):
            from safetensors.torch import load_file

            run.ema.load_state_dict(load_file(ema_file))
        else:
            warnings.warn(f"{folder} has no EMA weights; the EMA restarts from the current weights")


class RankState:
    """Trainer's rng_state.pth (one process) or rng_state_<rank>.pth (several): each rank's python/numpy/torch/cuda
    random streams now, and the loop's own two: the streams at the epoch's start and the loss accumulated since the
    last log record (not with save_only_model). A Trainer checkpoint has neither (trainer_format's docstring)."""

    def save(self, run, folder, writer):
        from .trainer_format import rng_file_name

        if not run.config.save_only_model:
            acc = run.accelerator
            state = {
                **rng_state(distributed=acc.num_processes > 1),
                "epoch_start": run.epoch_start_rng,
                "tr_loss": run.tr_loss.detach().cpu(),
            }
            torch.save(state, _path(folder, rng_file_name(acc)))

    def load(self, run, folder):
        from .trainer_format import rng_file_name

        rank = run.accelerator.process_index
        names = (rng_file_name(run.accelerator), f"rng_state_{rank}.pth")  # the second: one-process loop checkpoints
        rng_file = next((p for p in (_path(folder, n) for n in names) if os.path.exists(p)), None)
        run.saved_rng = None
        if rng_file is None:
            warnings.warn(f"{_path(folder, names[0])} is missing (different world size?); random streams will differ")
            return
        run.saved_rng = _torch_load(rng_file)
        if "tr_loss" in run.saved_rng:
            run.tr_loss.copy_(run.saved_rng["tr_loss"])


class Progress:
    """loop_state.json: the TrainState (step, data position, best metric, log history) and every stateful callback's
    state. On load the run keeps its own geometry and length (checked against the saved ones before anything is
    loaded)."""

    def save(self, run, folder, writer):
        if writer:
            run.state.callback_states = {
                type(cb).__name__: cb.state_dict() for cb in run.callbacks if hasattr(cb, "state_dict")
            }
            with open(_path(folder, "loop_state.json"), "w") as f:
                f.write(run.state.to_json())

    def load(self, run, folder):
        saved = read_state(folder, run)
        saved.geometry, saved.max_steps = run.state.geometry, run.state.max_steps
        run.state = saved
        for cb in run.callbacks:
            if hasattr(cb, "load_state_dict") and type(cb).__name__ in saved.callback_states:
                cb.load_state_dict(saved.callback_states[type(cb).__name__])


class Settings:
    """train_config.json and fast_plan.json: what the run was made with, for the record (the TrainConfig, and what
    `fast` and the levers' fields turned on). Nothing is loaded from them (a resume runs with its own settings;
    fit.resume checks the geometry)."""

    def save(self, run, folder, writer):
        if writer:
            with open(_path(folder, "train_config.json"), "w") as f:
                json.dump(run.config.to_dict(), f, indent=1)
            if run.fast is not None:  # what `fast` and the levers' fields turned on, and why not the rest
                with open(_path(folder, "fast_plan.json"), "w") as f:
                    json.dump(run.fast.to_dict(), f, indent=1)

    def load(self, run, folder):
        pass


class TrainerFiles:
    """trainer_state.json, training_args.bin and the model's config.json: what Trainer needs besides the files above
    to resume from this checkpoint as from its own (trainer_format.py). Loaded through Progress, from a checkpoint
    Trainer wrote."""

    def save(self, run, folder, writer):
        from . import trainer_format

        if writer:
            trainer_format.write(run, folder)

    def load(self, run, folder):
        pass


PARTS = (
    ModelAndOptimizer(),
    Scheduler(),
    Scaler(),
    EMAWeights(),
    RankState(),
    Progress(),
    Settings(),
    TrainerFiles(),
)


def read_state(path: str, run=None):
    """The progress a checkpoint holds: loop_state.json, or a Trainer checkpoint's trainer_state.json (with the run:
    its data position in the run's geometry)."""
    from . import trainer_format
    from .state import TrainState

    if trainer_format.is_trainer_checkpoint(path):
        return trainer_format.read_trainer_state(path, run)
    with open(os.path.join(path, "loop_state.json")) as f:
        return TrainState.from_json(f.read())
