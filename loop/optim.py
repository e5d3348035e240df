"""Optimizer and learning-rate schedule, built exactly as Trainer builds them (same groups, same order, same kwargs)."""

from __future__ import annotations

import re

import torch
from torch import nn

from .errors import LoopError
from .fast import optimizer_name

# Trainer's rule: no weight decay on biases, LayerNorm weights, or anything whose name says norm.
_NO_DECAY = [re.compile(p) for p in (r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)")]


def decay_parameter_names(module: nn.Module) -> list[str]:
    """Names of the parameters that get weight decay: not inside an nn.LayerNorm, and not matching _NO_DECAY."""
    names = []
    for child_name, child in module.named_children():
        for n in decay_parameter_names(child):
            full = f"{child_name}.{n}"
            if not isinstance(child, nn.LayerNorm) and not any(p.search(full.lower()) for p in _NO_DECAY):
                names.append(full)
    names += [k for k in module._parameters if not any(p.search(k.lower()) for p in _NO_DECAY)]
    return names


# optim_args each optimizer takes, as Trainer reads them: (numbers, booleans). Trainer ignores any other key (and
# every key for AdamW and Adafactor); the loop refuses it, so that a typo does not train with the default.
OPTIM_ARGS = {
    "sgd": (("momentum", "dampening", "weight_decay"), ("nesterov",)),
    "adagrad": (("lr_decay", "weight_decay", "eps"), ()),
    "rmsprop": (("momentum", "alpha", "eps", "weight_decay"), ("centered",)),
}


def optim_args(optim: str, text) -> dict:
    """`optim_args` 'k=v,k=v' as the optimizer's typed keyword arguments, or one line naming what is wrong."""
    if not text:
        return {}
    try:
        extra = dict(kv.split("=") for kv in text.replace(" ", "").split(","))
    except ValueError:
        raise LoopError(f"optim_args={text!r} is malformed; write it as 'key=value,key=value'") from None
    numbers, flags = OPTIM_ARGS.get(optim, ((), ()))
    if unused := [k for k in extra if k not in numbers + flags]:
        takes = (
            f"it takes {', '.join(numbers + flags)}"
            if numbers
            else "it takes none: set adam_beta1, adam_beta2, adam_epsilon, weight_decay"
            if optim.startswith("adamw")
            else "it takes none"
        )
        raise LoopError(
            f"optim_args {', '.join(unused)}: optim {optim} does not use {'it' if len(unused) == 1 else 'them'}"
            f" (Trainer would ignore {'it' if len(unused) == 1 else 'them'}); {takes}"
        )
    kwargs = {}
    for key, value in extra.items():
        if key in flags:
            kwargs[key] = value.lower() in ("true", "1", "yes")
            continue
        try:
            kwargs[key] = float(value)
        except ValueError:
            raise LoopError(f"optim_args {key}={value!r} is not a number; write e.g. {key}=0.9") from None
    return kwargs


def parameter_groups(config, model: nn.Module) -> tuple[list[dict], list[str]]:
    """Trainer's two groups (weight decay / none), then two per `param_groups` entry, and the entries' names.

    A parameter goes to the first entry whose `pattern` (a regular expression) it matches by name, else to the
    default groups at learning_rate/weight_decay. Within every entry biases and norm weights keep no weight decay.
    The default groups come first (possibly empty), so group 0's learning rate is `learning_rate`'s schedule, which
    is what the `learning_rate` record reports, as in Trainer.
    """
    decay = set(decay_parameter_names(model))
    entries = config.param_groups or []
    patterns = [re.compile(e["pattern"]) for e in entries]
    buckets = [([], []) for _ in range(len(entries) + 1)]  # (decay, no decay) for the default, then each entry
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        i = next((j + 1 for j, pat in enumerate(patterns) if pat.search(n)), 0)
        buckets[i][0 if n in decay else 1].append(p)
    for e, (with_decay, without) in zip(entries, buckets[1:]):
        if not with_decay and not without:
            names = [n for n, p in model.named_parameters() if p.requires_grad][:3]
            raise LoopError(
                f"param_groups pattern {e['pattern']!r} matches no trainable parameter not already taken "
                f"by an earlier entry; parameter names look like {', '.join(names)}"
            )
    groups = [
        {"params": buckets[0][0], "weight_decay": config.weight_decay},
        {"params": buckets[0][1], "weight_decay": 0.0},
    ]
    for e, (with_decay, without) in zip(entries, buckets[1:]):
        lr = {"lr": e["learning_rate"]} if "learning_rate" in e else {}
        groups += [
            {"params": with_decay, "weight_decay": e.get("weight_decay", config.weight_decay), **lr},
            {"params": without, "weight_decay": 0.0, **lr},
        ]
    if not any(g["params"] for g in groups):
        raise LoopError("the model has no trainable parameters; unfreeze some (requires_grad=True) before training")
    return groups, [e.get("name", e["pattern"]) for e in entries]


def build_optimizer(config, model: nn.Module, optimizer_cls_and_kwargs=None) -> torch.optim.Optimizer:
    """The optimizer Trainer's create_optimizer builds: `optim` by name, or `optimizer_cls_and_kwargs=(cls, kwargs)`
    over the same parameter groups (the kwargs then hold the learning rate, as in Trainer)."""
    groups, _ = parameter_groups(config, model)
    if optimizer_cls_and_kwargs is not None:
        cls, kwargs = optimizer_cls_and_kwargs
        return cls(groups, **dict(kwargs))
    kwargs = {"lr": config.learning_rate}
    name = optimizer_name(config)  # adamw_torch_fused for adamw_torch under fast (fast.py)
    if name in ("adamw_torch", "adamw_torch_fused"):
        kwargs.update(betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_epsilon)
        if name == "adamw_torch_fused":
            kwargs["fused"] = True
        return torch.optim.AdamW(groups, **kwargs)
    if name == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(groups, scale_parameter=False, relative_step=False, **kwargs)
    kwargs.update(optim_args(name, config.optim_args))
    cls = {"sgd": torch.optim.SGD, "adagrad": torch.optim.Adagrad, "rmsprop": torch.optim.RMSprop}[name]
    return cls(groups, **kwargs)


def build_scheduler(config, optimizer, total_steps: int):
    from transformers import get_scheduler

    warmup = config.warmup_for(total_steps)
    try:
        scheduler = get_scheduler(
            config.lr_scheduler_type,
            optimizer=optimizer,
            num_warmup_steps=warmup,
            num_training_steps=total_steps,
            scheduler_specific_kwargs=config.lr_scheduler_kwargs,
        )
        # a schedule's kwargs are first used where its shape starts (e.g. num_cycles after the warmup): try the
        # schedule there and at the end now, rather than fail mid-run
        for lr_lambda in getattr(scheduler, "lr_lambdas", []):
            for step in {0, warmup, warmup + 1, total_steps // 2, total_steps}:
                lr_lambda(step)
        return scheduler
    except (TypeError, ValueError) as e:
        raise LoopError(
            f"lr_scheduler_type={config.lr_scheduler_type!r} with lr_scheduler_kwargs="
            f"{config.lr_scheduler_kwargs!r} failed: {e}"
        ) from None


def is_plateau(scheduler) -> bool:
    """A scheduler that steps on the evaluation metric (ReduceLROnPlateau, transformers' GreedyLR), not each step."""
    import transformers.optimization

    on_metric = (torch.optim.lr_scheduler.ReduceLROnPlateau, getattr(transformers.optimization, "GreedyLR", ()))
    return isinstance(scheduler, tuple(t for t in on_metric if isinstance(t, type)))


def current_lr(scheduler, optimizer) -> float:
    """Trainer's _get_learning_rate: the scheduler's last lr (the group's lr for ReduceLROnPlateau)."""
    lr = optimizer.param_groups[0]["lr"] if is_plateau(scheduler) else scheduler.get_last_lr()[0]
    return lr.item() if torch.is_tensor(lr) else lr


def group_lrs(scheduler, optimizer) -> list[float]:
    """The learning rate of each `param_groups` entry (its weight-decay group: groups 2, 4, ...), as current_lr."""
    lrs = [g["lr"] for g in optimizer.param_groups] if is_plateau(scheduler) else scheduler.get_last_lr()
    return [lr.item() if torch.is_tensor(lr) else lr for lr in lrs[2::2]]
