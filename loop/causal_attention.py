"""SDPA's causal kernel for plain causal rows under torch.compile (`skip_causal_mask: true`, part of `fast`).

Why. For rows with neither padding nor packed documents (no attention_mask, no position_ids: run_clm.py's
group_texts, llm.c's stream) transformers passes SDPA no mask and `is_causal=True` in eager mode. Under torch.compile
it cannot tell (torch < 2.14) and builds the dense causal mask [batch, 1, T, T] instead; SDPA's kernels then read the
mask and compute the masked half: at GPT-2 124M's shape most of the attention's time
(docs/benchmarks/2026-12-02-h200-llmc-stream.md has the figures).

What. The model's attention is transformers' own SDPA function under a mask rule of its own: no mask when the
batch has no padding mask and the query and key lengths are equal (training and evaluation without a cache), so SDPA
runs with `is_causal=True` as in eager mode; transformers' SDPA mask otherwise. The same attention as the default
(eager) path, on the same kernels.
"""

from __future__ import annotations

NAME = "loop_sdpa_causal"


def _mask(*, q_length, kv_length, attention_mask=None, **kwargs):
    from transformers.masking_utils import sdpa_mask

    if attention_mask is None and q_length == kv_length:
        return None  # unpadded rows, no cache: SDPA's is_causal (sdpa_attention_forward sets it for a None mask)
    return sdpa_mask(q_length=q_length, kv_length=kv_length, attention_mask=attention_mask, **kwargs)


def register():
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    AttentionInterface.register(NAME, ALL_ATTENTION_FUNCTIONS["sdpa"])
    AttentionMaskInterface.register(NAME, _mask)


def why_not(model, batch: dict):
    """The reason skip_causal_mask cannot serve this model and data, or None. `batch` is one collated training batch."""
    from .varlen_attention import SUPPORTED

    config = getattr(model, "config", None)
    implementation = getattr(config, "_attn_implementation", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED:
        return (
            f"it serves the causal LMs {', '.join(SUPPORTED)} (transformers' attention interface), not {model_type!r}"
        )
    if implementation != "sdpa":
        return f"the model's attention implementation is {implementation!r}, not 'sdpa'"
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        return "the model uses sliding-window attention"
    if "attention_mask" in batch or "position_ids" in batch:
        return "the training batches carry an attention_mask or position_ids (padded or packed rows)"
    return None


def enable(model) -> None:
    """Route `model`'s attention through SDPA with the mask rule above (undone after the run by ModelChanges)."""
    register()
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(NAME)
    else:
        model.config._attn_implementation = NAME


__all__ = ["NAME", "enable", "why_not", "register"]
