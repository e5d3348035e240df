"""Attention over packed rows without a dense mask (`varlen_attention: true`, part of `fast`).

Why. Packed rows hold several documents, each restarting its position_ids at 0; no token may attend across a
document boundary. transformers then builds a dense block-diagonal causal mask, [batch, 1, T, T], and SDPA can only
serve a dense mask with its masked kernels (cuDNN's or the memory-efficient one), slower than the flash kernel
(docs/benchmarks/ has the figures). Flex attention and
the `varlen_attn` API would avoid the mask but do no dropout, and GPT-2 trains with attention dropout 0.1.

What. PyTorch ships FlashAttention-2's variable-length kernel, dropout included (`aten._flash_attention_forward`
with cumulative sequence lengths). The rows are flattened to [tokens, heads, head_dim] and every document is one
sequence: `cu_seqlens` marks where position_ids stop counting up by one (transformers' rule for packed rows) and
where every row starts. It is the same attention: causal within each document, softmax scale as the model's,
dropout as the model's. Dropout draws a different random pattern from SDPA's kernels, as SDPA's own kernels differ
from each other.

No host sync. The number of documents in a batch varies; the kernel takes a fixed-size `cu_seqlens`
(`torch.nonzero_static`), padded with zero-length sequences, whose size is a bound known before training: the sum of
the largest per-row document counts over a batch's rows, counted once over the collated training set. Under
no_grad (evaluation, prediction: other data) the exact count is read instead, a sync per forward there.

A batch that comes with a padding mask gets the model's attention with that mask through SDPA with a dense mask, as
transformers' SDPA path would give it. On a CPU (tests) the same maths runs per document with SDPA.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .errors import LoopError

NAME = "loop_varlen"
SUPPORTED = ("gpt2", "llama", "mistral", "qwen2", "qwen3", "olmo", "olmo2", "phi3", "smollm3")


# ---------------------------------------------------------------------------------------------- the kernel (CUDA)
@torch.library.custom_op("loop::varlen_flash_fwd", mutates_args=())
def _flash_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, max_len: int, dropout: float, scale: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    out, lse, rng, unused, _ = torch.ops.aten._flash_attention_forward(
        q, k, v, cu, cu, max_len, max_len, dropout, True, False, scale=scale
    )
    return out, lse, rng, unused


@_flash_fwd.register_fake
def _(q, k, v, cu, max_len, dropout, scale):
    out, lse, rng, unused, _ = torch.ops.aten._flash_attention_forward(
        q, k, v, cu, cu, max_len, max_len, dropout, True, False, scale=scale
    )
    return out, lse, rng, unused


@torch.library.custom_op("loop::varlen_flash_bwd", mutates_args=())
def _flash_bwd(
    g: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    cu: torch.Tensor,
    rng: torch.Tensor,
    unused: torch.Tensor,
    max_len: int,
    dropout: float,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dq, dk, dv = torch.ops.aten._flash_attention_backward(
        g.contiguous(), q, k, v, out, lse, cu, cu, max_len, max_len, dropout, True, rng, unused, scale=scale
    )
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


@_flash_bwd.register_fake
def _(g, q, k, v, out, lse, cu, rng, unused, max_len, dropout, scale):
    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape))


def _setup(ctx, inputs, output):
    q, k, v, cu, max_len, dropout, scale = inputs
    out, lse, rng, unused = output
    ctx.save_for_backward(q, k, v, out, lse, cu, rng, unused)
    ctx.args = (max_len, dropout, scale)


def _backward(ctx, g_out, *_):
    q, k, v, out, lse, cu, rng, unused = ctx.saved_tensors
    dq, dk, dv = _flash_bwd(g_out, q, k, v, out, lse, cu, rng, unused, *ctx.args)
    return dq, dk, dv, None, None, None, None


_flash_fwd.register_autograd(_backward, setup_context=_setup)


def _per_document(q, k, v, cu, dropout: float, scale: float):
    """The same maths one document at a time with SDPA (CPU and tests; reads the boundaries on the host)."""
    bounds = cu.tolist()
    gqa = k.shape[1] != q.shape[1]
    outs = [
        F.scaled_dot_product_attention(
            *(t[s:e].transpose(0, 1) for t in (q, k, v)), is_causal=True, dropout_p=dropout, scale=scale, enable_gqa=gqa
        ).transpose(0, 1)
        for s, e in zip(bounds[:-1], bounds[1:])
        if e > s
    ]
    return torch.cat(outs)


# ---------------------------------------------------------------------------------------------- the boundaries
def document_starts(position_ids, batch: int, width: int):
    """[batch, width] bool: True where a document starts. transformers' rule for packed rows (masking_utils'
    find_packed_sequence_indices): wherever a position does not follow the previous one by exactly 1, and at every
    row's first token."""
    pos = position_ids.expand(batch, width)
    starts = torch.ones_like(pos, dtype=torch.bool)
    starts[:, 1:] = pos[:, 1:] != pos[:, :-1] + 1
    return starts


def cu_seqlens(starts, size: int):
    """int32 cumulative sequence lengths of `size` + 1 entries (trailing zero-length sequences), without a sync."""
    total = starts.numel()
    first = torch.nonzero_static(starts.reshape(-1), size=size, fill_value=total).flatten()
    return torch.cat([first, first.new_full((1,), total)]).to(torch.int32)


def segment_bound(counts, batch_size: int) -> int:
    """Most documents a batch of `batch_size` rows can hold: the sum of the largest per-row counts."""
    counts = torch.as_tensor(counts)
    return int(counts.topk(min(batch_size, counts.numel())).values.sum())


# ---------------------------------------------------------------------------------------------- the attention
def _padded(module, query, key, value, attention_mask, dropout, scaling):
    """Anything but unmasked causal self-attention (a padding mask, cross-attention, a cache): the model's attention
    through SDPA with a dense mask, as transformers' own SDPA path builds it (which, given a padding mask, does not
    look for packed documents). A query with nothing to attend attends to itself, so padded rows stay finite."""
    t_q, t_k = query.shape[2], key.shape[2]
    causal = getattr(module, "is_causal", True)
    keep = torch.ones(t_q, t_k, dtype=torch.bool, device=query.device)
    if causal:
        keep = keep.tril(t_k - t_q)
    if attention_mask is not None:
        mask = attention_mask if attention_mask.dtype == torch.bool else attention_mask > 0
        keep = keep[None, None] & (mask[:, None, None, :] if mask.dim() == 2 else mask)
        if causal:
            keep = keep | _diagonal(t_q, t_k, query.device)
    out = F.scaled_dot_product_attention(
        query, key, value, attn_mask=keep, dropout_p=dropout, scale=scaling, enable_gqa=key.shape[1] != query.shape[1]
    )
    return out.transpose(1, 2).contiguous(), None


def _diagonal(t_q: int, t_k: int, device):
    """[t_q, t_k] bool: each query's own key (the last t_q keys)."""
    return torch.arange(t_k, device=device)[None, :] == (torch.arange(t_q, device=device) + t_k - t_q)[:, None]


def attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, is_causal=None, **kwargs):
    """transformers' attention interface: query/key/value [batch, heads, T, head_dim] -> ([batch, T, heads, dim], None)."""
    if attention_mask is not None or not getattr(module, "is_causal", True) or query.shape[2] != key.shape[2]:
        return _padded(module, query, key, value, attention_mask, dropout, scaling)
    batch, heads, width, dim = query.shape
    scale = scaling if scaling is not None else dim**-0.5
    position_ids = kwargs.get("position_ids")
    if position_ids is None:
        position_ids = torch.arange(width, device=query.device)[None]
    starts = document_starts(position_ids, batch, width)
    bound = getattr(module, "_loop_varlen_segments", None)
    if bound is None or not torch.is_grad_enabled():  # evaluation/prediction data: the exact count (a sync)
        bound = int(starts.sum())
    cu = cu_seqlens(starts, bound)
    q, k, v = (t.transpose(1, 2).reshape(batch * width, t.shape[1], dim) for t in (query, key, value))
    if q.is_cuda:
        out = _flash_fwd(q, k, v, cu, width, float(dropout), float(scale))[0]
    else:
        out = _per_document(q, k, v, cu, dropout, scale)
    return out.view(batch, width, heads, dim), None


def register():
    """The attention function, and flash attention's mask rule: no mask for packed or unpadded rows (so no dense
    mask is built), the 2D padding mask as it is otherwise."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    AttentionInterface.register(NAME, attention)
    AttentionMaskInterface.register(NAME, ALL_MASK_ATTENTION_FUNCTIONS["flash_attention_2"])


# ---------------------------------------------------------------------------------------------- where it applies
def why_not(model, device, precision: str, batch: dict):
    """The reason varlen_attention cannot serve this model and data, or None. `batch` is one collated training batch."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED:
        return (
            f"it serves the causal LMs {', '.join(SUPPORTED)} (transformers' attention interface), not {model_type!r}"
        )
    heads = getattr(config, "num_attention_heads", None)
    dim = getattr(config, "head_dim", None) or (config.hidden_size // heads if heads else None)
    if not dim or dim % 8 or dim > 256:
        return f"the flash kernel takes a head size that is a multiple of 8 up to 256, not {dim}"
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        return "the model uses sliding-window attention"
    if "position_ids" not in batch or "attention_mask" in batch:
        return (
            "the training batches are not packed rows (position_ids restarting per document, no attention_mask); "
            "padded rows are served best by SDPA"
        )
    if precision not in ("bf16", "fp16"):
        return "the flash kernel takes bf16/fp16 only; train with --bf16 true (or --fp16 true)"
    if device.type != "cuda":
        return "it runs PyTorch's flash-attention kernel, which needs a CUDA device"
    if torch.cuda.get_device_capability(device) < (8, 0) or not torch.backends.cuda.is_flash_attention_available():
        return "this GPU or PyTorch build has no flash-attention kernel (it needs sm80 or newer)"
    return None


def enable(model, segments: int) -> None:
    """Route `model`'s attention through `attention`, with `segments` as the per-batch document bound in training."""
    register()
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(NAME)
    else:
        model.config._attn_implementation = NAME
    for m in model.modules():
        m._loop_varlen_segments = segments


def count_documents(batches) -> torch.Tensor:
    """Per-row document counts over collated batches (each a dict with position_ids [rows, T])."""
    counts = [
        document_starts(b["position_ids"], b["position_ids"].shape[0], b["position_ids"].shape[1]).sum(1).cpu()
        for b in batches
    ]
    if not counts:
        raise LoopError("varlen_attention found no training rows to count documents in")
    return torch.cat(counts)


__all__ = ["attention", "enable", "why_not", "cu_seqlens", "document_starts", "segment_bound", "count_documents"]
