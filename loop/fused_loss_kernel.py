"""The fused cross-entropy's softmax as one Triton kernel (CUDA only; `loop.fused_loss` calls it per chunk).

For each row of the chunk's logits [rows, Vp] (Vp: the vocabulary padded, padded columns ignored): the log-sum-exp
in fp32 by an online max and sum over the columns (one read), the row's loss (log-sum-exp minus the target's logit,
0 for an ignored row), then the row overwritten with softmax minus one-hot (a second read and one write, in the
logits' dtype; 0 on an ignored row and in the padded columns).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _softmax_minus_onehot(logits_ptr, targets_ptr, loss_ptr, stride, vocab, n_cols, ignore_index, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride
    target = tl.load(targets_ptr + row)
    valid = target != ignore_index
    m = tl.full([BLOCK], -1.0e30, tl.float32)  # finite start: exp(-inf - m) is 0, never nan
    s = tl.zeros([BLOCK], tl.float32)
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(base + cols, mask=cols < vocab, other=-float("inf")).to(tl.float32)
        m_new = tl.maximum(m, x)
        s = s * tl.exp(m - m_new) + tl.exp(x - m_new)
        m = m_new
    top = tl.max(m, 0)
    lse = top + tl.log(tl.sum(s * tl.exp(m - top), 0))
    safe = tl.where(valid, target, 0)
    x_target = tl.load(base + safe).to(tl.float32)
    tl.store(loss_ptr + row, tl.where(valid, lse - x_target, 0.0))
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(base + cols, mask=cols < vocab, other=-float("inf")).to(tl.float32)
        g = tl.exp(x - lse) - tl.where(cols == target, 1.0, 0.0)
        g = tl.where(valid, g, 0.0)
        tl.store(base + cols, g.to(logits_ptr.dtype.element_ty), mask=cols < n_cols)


def softmax_minus_onehot_(logits: torch.Tensor, targets: torch.Tensor, vocab: int, ignore_index: int) -> torch.Tensor:
    """Overwrite logits [rows, Vp] (contiguous rows) with softmax minus one-hot; return each row's loss (fp32).
    4096 columns a step and 8 warps: the fastest of the blocks from 1024 to 8192 columns and 4 to 16 warps tried over
    GPT-2's vocabulary on an H200 (docs/benchmarks/2026-12-02-h200-llmc-stream.md)."""
    rows, n_cols = logits.shape
    loss = torch.empty(rows, dtype=torch.float32, device=logits.device)
    _softmax_minus_onehot[(rows,)](
        logits, targets, loss, logits.stride(0), vocab, n_cols, ignore_index, BLOCK=4096, num_warps=8
    )
    return loss
