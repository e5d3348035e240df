"""Attention kernels for packed rows at GPT-2 124M's shape, one layer's forward and backward on the GPU: PyTorch's
FlashAttention-2 variable-length kernel (what `varlen_attention` uses) against cuDNN's variable-length kernel
(`aten._cudnn_attention_forward` with cumulative lengths, its backward through autograd), with and without dropout,
and with the cumulative lengths padded by empty sequences as the loop pads them. Then cuDNN's output and gradients
against FlashAttention's at dropout 0. Not a test (no assertion): a measurement for docs/benchmarks.

    python benchmarks/attention_probe.py
"""

import torch

torch.manual_seed(0)
dev, A = "cuda", torch.ops.aten
B, T, H, D = 16, 1024, 12, 64  # 16 packed rows of 1024 tokens, 12 heads of 64
scale = D**-0.5
g = torch.Generator().manual_seed(1)
bounds = [0]  # documents of long-tailed lengths (mean ~300 before cutting), cut at row boundaries
for r in range(B):
    pos = 0
    while pos < T:
        pos = min(T, pos + int(torch.empty(1).exponential_(1 / 300, generator=g).item()) + 8)
        bounds.append(r * T + pos)
cu_exact = torch.tensor(bounds, dtype=torch.int32, device=dev)
cu_padded = torch.tensor(bounds + [B * T] * 40, dtype=torch.int32, device=dev)
longest = max(b - a for a, b in zip(bounds[:-1], bounds[1:]))
print(f"{len(bounds) - 1} documents, longest {longest}, mean {B * T / (len(bounds) - 1):.0f} tokens")
q, k, v = (torch.randn(B * T, H, D, device=dev, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
grad_out = torch.randn_like(q)


def flash(cu, p):
    out, lse, rng, unused, _ = A._flash_attention_forward(
        q, k, v, cu, cu, longest, longest, p, True, False, scale=scale
    )
    grads = A._flash_attention_backward(
        grad_out, q, k, v, out, lse, cu, cu, longest, longest, p, True, rng, unused, scale=scale
    )
    return (out, *grads)


def cudnn(cu, p):  # its backward op wants an undefined attn_bias, which only autograd passes
    out = A._cudnn_attention_forward(q, k, v, None, cu, cu, longest, longest, True, p, True, False, scale=scale)[0]
    return (out.detach(), *torch.autograd.grad(out, (q, k, v), grad_out))


def ms(fn, *args, n=50):
    for _ in range(5):
        fn(*args)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(n):
        fn(*args)
    end.record()
    torch.cuda.synchronize()  # a sync point on purpose: read the events
    return start.elapsed_time(end) / n


for name, fn in (("flash", flash), ("cudnn", cudnn)):
    for label, cu in (("exact", cu_exact), ("padded", cu_padded)):
        for p in (0.0, 0.1):
            t = ms(fn, cu, p)
            print(f"{name} {label} cu_seqlens, dropout {p}: {t:.3f} ms a layer, {12 * t:.2f} ms for 12 layers")
for label, cu in (("exact", cu_exact), ("padded", cu_padded)):
    for part, a, b in zip(("out", "dq", "dk", "dv"), flash(cu, 0.0), cudnn(cu, 0.0)):
        print(
            f"cudnn vs flash, {label}, {part}: max abs difference {(a.float() - b.float()).abs().max().item():.3e} "
            f"(largest |flash| {a.float().abs().max().item():.3e})"
        )
print(torch.__version__, "cuDNN", torch.backends.cudnn.version(), torch.cuda.get_device_name())
