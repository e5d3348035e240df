"""The two largest kernels of GPT-2 124M's step at llm.c's settings (64 rows of 1024 tokens, dropout 0), on their own
on the GPU. Not a test (no assertion): a measurement for docs/benchmarks.

1. Attention, forward and backward of one layer: FlashAttention-2 and cuDNN through SDPA over plain causal rows (llm.c's
   attention: documents joined in one stream), against FlashAttention-2's variable-length kernel over the same rows cut
   into documents (what `varlen_attention` runs for packed rows). cuDNN's output and gradients against flash's.
2. The fused linear cross-entropy (`loop.fused_loss`) forward and backward over 65,536 tokens and GPT-2's vocabulary:
   as inductor compiles its chunk, and with the chunk's softmax in the Triton kernel of `loop.fused_loss_kernel`
   (what the loss runs on CUDA).

    python benchmarks/llmc_probe.py
"""

import os
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from loop import fused_loss  # noqa: E402

dev, A = "cuda", torch.ops.aten
torch.manual_seed(0)


def ms(fn, n=20):
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(n):
        fn()
    end.record()
    torch.cuda.synchronize()  # a sync point on purpose: read the events
    return start.elapsed_time(end) / n


# ---------------------------------------------------------------------------------------------- attention
B, T, H, D = 64, 1024, 12, 64
q, k, v = (torch.randn(B, H, T, D, device=dev, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
g_out = torch.randn_like(q)
print("SDPA's own choice for plain causal rows:", torch._fused_sdp_choice(q, k, v, is_causal=True))


def sdpa(backend, p=0.0):
    def run():
        with sdpa_kernel([backend]):
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=p)
        return (out.detach(), *torch.autograd.grad(out, (q, k, v), g_out))

    return run


gen = torch.Generator().manual_seed(1)
bounds = [0]
for r in range(B):
    pos = 0
    while pos < T:
        pos = min(T, pos + int(torch.empty(1).exponential_(1 / 300, generator=gen).item()) + 8)
        bounds.append(r * T + pos)
cu = torch.tensor(bounds + [B * T] * 40, dtype=torch.int32, device=dev)
qv, kv, vv = (t.detach().transpose(1, 2).reshape(B * T, H, D).contiguous() for t in (q, k, v))
gv = g_out.transpose(1, 2).reshape(B * T, H, D).contiguous()


def varlen():
    out, lse, rng, unused, _ = A._flash_attention_forward(qv, kv, vv, cu, cu, T, T, 0.0, True, False, scale=D**-0.5)
    return A._flash_attention_backward(gv, qv, kv, vv, out, lse, cu, cu, T, T, 0.0, True, rng, unused, scale=D**-0.5)


for name, fn in (
    ("flash, plain causal", sdpa(SDPBackend.FLASH_ATTENTION)),
    ("cudnn, plain causal", sdpa(SDPBackend.CUDNN_ATTENTION)),
    ("efficient, plain causal", sdpa(SDPBackend.EFFICIENT_ATTENTION)),
    ("flash varlen, documents", varlen),
):
    try:
        t = ms(fn)
        print(f"attention {name}: {t:.3f} ms a layer forward+backward, {12 * t:.2f} ms for 12 layers")
    except Exception as e:  # noqa: BLE001 - a probe: report and go on
        print(f"attention {name}: failed: {type(e).__name__}: {str(e)[:200]}")
try:
    for part, a, b in zip(
        ("out", "dq", "dk", "dv"), sdpa(SDPBackend.FLASH_ATTENTION)(), sdpa(SDPBackend.CUDNN_ATTENTION)()
    ):
        print(
            f"cudnn vs flash {part}: max abs difference {(a.float() - b.float()).abs().max().item():.3e} "
            f"(largest |flash| {a.float().abs().max().item():.3e})"
        )
except Exception as e:  # noqa: BLE001
    print("cudnn comparison failed:", e)
# the layouts GPT-2's attention hands SDPA: q, k, v split from one [B, T, 3C] projection and viewed as [B, H, T, D]
# (strided), and the output's gradient coming back through the transpose to [B, T, C]
qkv = torch.randn(B, T, 3 * H * D, device=dev, dtype=torch.bfloat16, requires_grad=True)
layouts = {
    "contiguous [B,H,T,D]": lambda: (q, k, v, g_out),
    "GPT-2's split of one projection": lambda: (
        *(t.view(B, T, H, D).transpose(1, 2) for t in qkv.split(H * D, dim=2)),
        g_out.transpose(1, 2).contiguous().transpose(1, 2),
    ),
    "split, made contiguous": lambda: (
        *(t.view(B, T, H, D).transpose(1, 2).contiguous() for t in qkv.split(H * D, dim=2)),
        g_out,
    ),
}
for backend in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION):
    for name, make in layouts.items():

        def fwd_bwd(make=make, backend=backend):
            a, b, c, g = make()
            with sdpa_kernel([backend]):
                out = F.scaled_dot_product_attention(a, b, c, is_causal=True)
            out.backward(g)

        def fwd(make=make, backend=backend):
            a, b, c, g = make()
            with torch.no_grad(), sdpa_kernel([backend]):
                F.scaled_dot_product_attention(a, b, c, is_causal=True)

        print(f"layout {name}, {backend.name}: forward {ms(fwd):.3f}, forward+backward {ms(fwd_bwd):.3f} ms a layer")


def gpt2_attention(qkv):  # GPT-2's attention around SDPA: split, heads, SDPA, heads back
    a, b, c = (t.view(B, T, H, D).transpose(1, 2) for t in qkv.split(H * D, dim=2))
    return F.scaled_dot_product_attention(a, b, c, is_causal=True).transpose(1, 2).reshape(B, T, H * D)


g_flat = torch.randn(B, T, H * D, device=dev, dtype=torch.bfloat16)
for backend in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION):
    for name, fn in (("eager", gpt2_attention), ("compiled", torch.compile(gpt2_attention))):

        def fwd_bwd(fn=fn, backend=backend):
            with sdpa_kernel([backend]):
                out = fn(qkv)
            out.backward(g_flat)

        print(f"GPT-2's attention {name}, {backend.name}: forward+backward {ms(fwd_bwd):.3f} ms a layer")
q = k = v = g_out = qv = kv = vv = gv = qkv = g_flat = None  # free the attention tensors
torch.cuda.empty_cache()

# ---------------------------------------------------------------------------------------------- cross-entropy
N, d, V = 64 * 1024, 768, 50257
hidden = (torch.randn(N, d, device=dev) * 0.5).to(torch.bfloat16).requires_grad_(True)
weight = (torch.randn(V, d, device=dev) * 0.02).requires_grad_(True)
targets = torch.randint(0, V, (N,), device=dev)
targets[::50] = -100


def ce(**kw):
    def run():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = fused_loss.linear_cross_entropy(hidden, weight, targets, **kw)
        return (loss.detach(), *torch.autograd.grad(loss, (hidden, weight)))

    return run


results = {}
triton_chunk = fused_loss._chunk_fn


def inductor_chunk(device):
    return fused_loss._compiled.setdefault("cuda", torch.compile(fused_loss._chunk, dynamic=False))


for label, chunk_fn, kw in (
    ("inductor chunk, 5120 rows", inductor_chunk, {}),
    ("triton softmax, 5120 rows", triton_chunk, {}),
    ("triton softmax, 10240 rows", triton_chunk, {"chunk_rows": 10240}),
):
    fused_loss._chunk_fn = chunk_fn
    try:
        torch.cuda.reset_peak_memory_stats()
        t = ms(ce(**kw), n=10)
        results[label] = ce(**kw)()
        print(f"ce {label}: {t:.2f} ms forward+backward, peak {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
    except Exception as e:  # noqa: BLE001 - a probe: report and go on
        print(f"ce {label}: failed: {type(e).__name__}: {str(e)[:300]}")
ref = results.get("inductor chunk, 5120 rows")
for label, got in results.items():
    if ref is None or label.startswith("inductor"):
        continue
    print(
        f"ce {label} vs inductor's: loss {abs(got[0].item() - ref[0].item()):.3e} (of {ref[0].item():.5f}), "
        + ", ".join(
            f"{n} {(a.float() - b.float()).abs().max().item():.3e} (largest {b.float().abs().max().item():.3e})"
            for n, a, b in zip(("d hidden", "d weight"), got[1:], ref[1:])
        )
    )
print(torch.__version__, "cuDNN", torch.backends.cudnn.version(), torch.cuda.get_device_name())
