"""The caller's model is theirs: whatever a run changes on it is put back when the run returns or raises.

A run changes the model it is handed in many places: `use_cache` and gradient checkpointing (Trainer's settings),
the fused loss's head `forward` and `loss_function`, the attention implementation of `varlen_attention`, NEFTune's
and `debug`'s hooks, accelerate's mixed-precision `forward` wrapper, compile state, the train/eval mode. Rather than
one undo per feature (and a leak whenever a feature forgets its own), `ModelChanges` takes a shallow snapshot of what
can be changed when the run begins and restores it when the run ends:

  * every module's own attributes (its instance `__dict__`: `forward` patches, flags, `training`, compile state),
    with its hook tables (`_forward_hooks`, ...) restored in place;
  * every config object the modules point at (`use_cache`, `_attn_implementation`, `problem_type`, ...).

What a run is for stays: the trained weights and buffers (the tensors themselves are never put back), and the device
the model was moved to and the dtype `fp16_full_eval`/`bf16_full_eval` cast it to (as Trainer leaves both). A module whose class a distributed wrapper replaced (FSDP2's
`fully_shard`) is left as that wrapper made it: it cannot be unwrapped in place. The EMA's weight swaps are undone by
`ema.swapped`, not here.
"""

from __future__ import annotations

# a module's tensors and children: what training is for (kept), or torch's own bookkeeping of them
_KEEP = frozenset({"_parameters", "_buffers", "_modules", "_non_persistent_buffers_set"})


def _is_hook_table(name: str, value) -> bool:
    return "hook" in name and isinstance(value, dict)


class ModelChanges:
    """`with ModelChanges() as changes: changes.track(model); ...` puts `model` back as it was at track()."""

    def __init__(self):
        self._modules: list[tuple[object, type, dict, dict]] = []  # (module, class, attributes, hook tables)
        self._configs: list[tuple[object, dict]] = []

    def track(self, model) -> None:
        """Snapshot `model` (every submodule and the configs they point at); call before the run touches it."""
        from torch import nn

        if not isinstance(model, nn.Module):
            return
        seen_configs = set()
        for module in model.modules():
            attrs = {k: v for k, v in vars(module).items() if k not in _KEEP}
            hooks = {k: dict(v) for k, v in attrs.items() if _is_hook_table(k, v)}
            self._modules.append((module, type(module), attrs, hooks))
            config = vars(module).get("config")
            for cfg in _configs(config):
                if id(cfg) not in seen_configs:
                    seen_configs.add(id(cfg))
                    self._configs.append((cfg, dict(vars(cfg))))

    def restore(self) -> None:
        for module, cls, attrs, hooks in reversed(self._modules):
            if type(module) is not cls:  # a distributed wrapper replaced its class: leave it as it is now
                continue
            now = vars(module)
            for name in [k for k in now if k not in attrs and k not in _KEEP]:
                del now[name]  # added by the run (a patched forward, a flag, a hook handle)
            for name, value in attrs.items():
                if name in hooks:
                    table = now.get(name)
                    if table is value:
                        table.clear()
                        table.update(hooks[name])
                    else:
                        now[name] = value
                elif now.get(name, _MISSING) is not value:
                    now[name] = value
        for cfg, attrs in self._configs:
            now = vars(cfg)
            for name in [k for k in now if k not in attrs]:
                del now[name]
            now.update(attrs)
        self._modules.clear()
        self._configs.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.restore()
        return False


_MISSING = object()


def _configs(config):
    """A transformers config and the configs nested in it (a vision-language model's text_config, ...)."""
    from transformers import PretrainedConfig

    if isinstance(config, PretrainedConfig):
        yield config
        for value in vars(config).values():
            yield from _configs(value)
