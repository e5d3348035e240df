"""Fused linear cross-entropy for causal LMs (`fused_linear_cross_entropy: true`, part of `fast`).

Why. A causal LM's head turns [tokens, hidden] into [tokens, vocab] logits, and the loss upcasts them to fp32. For
GPT-2 124M at 16x1024 tokens that is 1.6 GB of bf16 logits kept for backward, 3.3 GB more in fp32, and accelerate's
mixed-precision wrapper returns another fp32 copy as `outputs.logits`. And GPT-2's vocabulary, 50257, is not a
multiple of 8, which sends the head's three GEMMs to slow unaligned kernels.

What. In training, the head hands its input (the last hidden states) to the loss instead of logits; the loss walks
the tokens in chunks: logits of one chunk (vocabulary padded to a multiple of 64 with -inf columns), log-sum-exp,
the loss, and at once the chunk's gradients with respect to the hidden states and the head weight (the softmax minus
the one-hot target, times the weight / the hidden states). Backward only scales what forward stored. Peak memory for
the loss is one chunk's logits; no full logits exist at any time. It is the same loss: cross-entropy of
hidden @ W^T in the autocast dtype, normalised by num_items_in_batch (else by the count of targets), with Trainer's
label shift; the tests check loss and gradients against the plain path to 1e-6 in fp32.

On CUDA the chunk's softmax is one Triton kernel (loop/fused_loss_kernel.py; inductor compiles the same maths
where Triton is missing); on a CPU the chunk runs eagerly.

Evaluation and anything under no_grad go through the model's own head and loss unchanged (metrics need logits).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .errors import LoopError

IGNORE_INDEX = -100
# causal LMs whose forward is `logits = lm_head(hidden); loss = loss_function(logits, labels, vocab_size, **kw)`
# with nothing applied to the logits in between (no soft-capping, no logit scale)
SUPPORTED = ("gpt2", "llama", "mistral", "qwen2", "qwen3", "gpt_neox", "olmo", "olmo2", "phi3", "smollm3")
PAD_VOCAB_TO = 64


def _chunk(hidden, weight, targets, vocab: int):
    """Loss sum, d(loss sum)/d(hidden) and d(loss sum)/d(weight) for one chunk (weight padded to [Vp, d]).

    The target's logit and the one-hot come from comparing column indices, not from gather and scatter_add, so that
    inductor fuses the log-sum-exp, the loss and the softmax-minus-one-hot into one kernel over the chunk's logits
    (one kernel where gather and scatter_add made two). The numbers are the same to the bit.
    """
    logits = (hidden @ weight.t()).float()
    col = torch.arange(weight.shape[0], device=logits.device)
    logits = torch.where(col < vocab, logits, -math.inf)  # padded columns take no probability
    valid = targets != IGNORE_INDEX
    is_target = col[None, :] == targets[:, None]  # all False on an ignored row (-100 is no column)
    lse = torch.logsumexp(logits, dim=-1)
    target_logit = torch.where(is_target, logits, 0.0).sum(-1)
    loss_sum = torch.where(valid, lse - target_logit, 0.0).sum()
    grad = torch.exp(logits - lse[:, None]) - is_target.float()  # softmax minus the one-hot
    grad = torch.where(valid[:, None], grad, 0.0).to(hidden.dtype)
    return loss_sum, grad @ weight, (grad.t() @ hidden).float()


_compiled = {}


def _chunk_triton(hidden, weight, targets, vocab: int):
    """`_chunk` with the softmax in one Triton kernel (loop/fused_loss_kernel.py) that overwrites the chunk's logits
    with the gradient: two reads and one write of the logits and no fp32 copy; faster than inductor's kernel over the
    same maths (docs/benchmarks/2026-12-02-h200-llmc-stream.md)."""
    from .fused_loss_kernel import softmax_minus_onehot_

    logits = hidden @ weight.t()
    loss_rows = softmax_minus_onehot_(logits, targets, vocab, IGNORE_INDEX)
    return loss_rows.sum(), logits @ weight, (logits.t() @ hidden).float()


def _chunk_fn(device):
    """The chunk maths on CUDA: the Triton kernel where Triton is installed (it is, with torch's CUDA wheels), else
    compiled by inductor (one fused reduction and one pointwise kernel around the GEMMs)."""
    if device.type != "cuda":
        return _chunk
    try:
        import triton  # noqa: F401
    except ImportError:
        pass
    else:
        return _chunk_triton
    if "cuda" not in _compiled:
        _compiled["cuda"] = torch.compile(_chunk, dynamic=False)
    return _compiled["cuda"]


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, divisor, chunk_rows, dtype):
        n, d = hidden.shape
        vocab = weight.shape[0]
        padded = -(-vocab // PAD_VOCAB_TO) * PAD_VOCAB_TO
        w = weight.to(dtype)
        if padded != vocab:
            w = torch.cat([w, w.new_zeros(padded - vocab, d)])
        fn = _chunk_fn(hidden.device)
        grad_hidden = torch.empty(n, d, dtype=dtype, device=hidden.device)
        loss = grad_weight = None
        for s in range(0, n, chunk_rows):
            part, gh, gw = fn(hidden[s : s + chunk_rows].to(dtype), w, targets[s : s + chunk_rows], vocab)
            grad_hidden[s : s + chunk_rows] = gh
            loss, grad_weight = (part, gw) if loss is None else (loss + part, grad_weight.add_(gw))
        ctx.save_for_backward(grad_hidden, grad_weight[:vocab], divisor)
        ctx.dtypes = (hidden.dtype, weight.dtype)
        return loss / divisor

    @staticmethod
    def backward(ctx, grad_out):
        grad_hidden, grad_weight, divisor = ctx.saved_tensors
        scale = grad_out / divisor
        return (
            (grad_hidden * scale).to(ctx.dtypes[0]),
            (grad_weight * scale).to(ctx.dtypes[1]),
            None,
            None,
            None,
            None,
        )


@torch.compiler.disable  # a graph break: the chunk loop runs eagerly around its own compiled chunk kernel
def linear_cross_entropy(hidden, weight, targets, num_items_in_batch=None, chunk_rows: int | None = None):
    """sum_i CE(hidden_i @ weight^T, targets_i) / num_items_in_batch (default: the number of targets != -100).

    hidden [..., d], weight [V, d], targets [...] aligned with hidden (already shifted). The logits are computed in
    the autocast dtype when autocast is on (as nn.Linear would), and the softmax in fp32.
    """
    device_type = hidden.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else hidden.dtype
    hidden = hidden.reshape(-1, hidden.shape[-1])
    targets = targets.reshape(-1).to(hidden.device)
    if num_items_in_batch is None:
        divisor = (targets != IGNORE_INDEX).sum().float()  # the mean over targets (a device tensor: no sync)
    else:
        divisor = torch.as_tensor(num_items_in_batch, device=hidden.device).float()
    if chunk_rows is None:  # about 512 MB of logits in the compute dtype per chunk (fewer chunks: fewer adds)
        chunk_rows = max(256, 2**28 // weight.shape[0] // 256 * 256)
    with torch.autocast(device_type, enabled=False):
        return _LinearCrossEntropy.apply(hidden, weight, targets, divisor, chunk_rows, dtype)


class _FusedLoss:
    """Stands in for model.loss_function: given hidden states (training), the fused loss; given logits, the original."""

    def __init__(self, head, original):
        self.head, self.original = head, original

    def __call__(
        self,
        logits,
        labels,
        vocab_size=None,
        num_items_in_batch=None,
        ignore_index=IGNORE_INDEX,
        shift_labels=None,
        **kwargs,
    ):
        if logits.shape[-1] != self.head.in_features or logits.shape[-1] == self.head.out_features:
            return self.original(
                logits,
                labels,
                vocab_size,
                num_items_in_batch=num_items_in_batch,
                ignore_index=ignore_index,
                shift_labels=shift_labels,
                **kwargs,
            )
        if shift_labels is None:  # Trainer's (transformers') shift: position t predicts token t+1
            shift_labels = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]
        if ignore_index != IGNORE_INDEX:
            shift_labels = torch.where(shift_labels == ignore_index, IGNORE_INDEX, shift_labels)
        weight = self.head.weight
        if hasattr(weight, "placements"):  # a DTensor shard: the head is an FSDP unit of its own, resharded by now
            raise LoopError(
                "fused_linear_cross_entropy needs the output layer in the root FSDP unit (as accelerate's "
                "TRANSFORMER_BASED_WRAP leaves it), not wrapped on its own; change the wrap policy or set "
                "fused_linear_cross_entropy false"
            )
        return linear_cross_entropy(logits, weight, shift_labels, num_items_in_batch)


def refusal(model, distributed_type: str):
    """Why the fused loss cannot serve this model on this topology exactly, or None."""
    from torch import nn

    model_type = getattr(getattr(model, "config", None), "model_type", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    why = None
    if model_type not in SUPPORTED or not isinstance(head, nn.Linear):
        why = (
            f"it supports causal LMs of type {', '.join(SUPPORTED)} (this model: {model_type or type(model).__name__})"
        )
    elif head.bias is not None or head.in_features == head.out_features:
        why = "the model's output layer has a bias or a square weight"
    elif distributed_type == "DEEPSPEED_ZERO3":  # FSDP2: the loss runs inside the root's forward, weights unsharded
        why = "under ZeRO-3 the head's weight is a placeholder outside its module's forward"
    return why


def applies(model, distributed_type: str = "NO") -> bool:
    return refusal(model, distributed_type) is None


def enable(model, distributed_type: str = "NO") -> None:
    """Make `model` (a transformers causal LM) compute its training loss with linear_cross_entropy. Refuses, with one
    line, a model or a topology it cannot serve exactly."""
    why = refusal(model, distributed_type)
    if why:
        raise LoopError(f"fused_linear_cross_entropy cannot be used here: {why}; set fused_linear_cross_entropy false")
    head = model.get_output_embeddings()
    if getattr(head, "_loop_fused", False):
        return
    plain_forward = head.forward

    def forward(hidden):  # in training the loss takes the hidden states; otherwise the usual logits
        if head.training and torch.is_grad_enabled():
            return hidden
        return plain_forward(hidden)

    head.forward = forward
    head._loop_fused = True
    model.loss_function = _FusedLoss(head, model.loss_function)


__all__ = ["linear_cross_entropy", "enable", "applies", "refusal", "SUPPORTED"]
