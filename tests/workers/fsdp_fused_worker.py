"""Run by test_distributed.py under torchrun (2 CPU processes, gloo): the fused linear cross-entropy on a model sharded
with FSDP2 (fully_shard on CPU; accelerate runs FSDP on GPUs only) against the same loss on the unsharded model (the
fused loss against the plain one is test_fast.py's). Both ranks feed the same batches, so FSDP2's averaged gradients
are the single-process gradients. Exits non-zero on a mismatch."""

import copy
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/: helpers
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))  # the repository

from helpers import tiny_gpt2  # noqa: E402
from torch.distributed.device_mesh import init_device_mesh  # noqa: E402
from torch.distributed.fsdp import fully_shard  # noqa: E402

from loop import fused_loss  # noqa: E402
from loop.compare import _weights_sha  # noqa: E402

dist.init_process_group("gloo")
rank = dist.get_rank()
mesh = init_device_mesh("cpu", (dist.get_world_size(),))
reference = tiny_gpt2(vocab=101)  # tied head (GPT-2): the weight lives in the root's FSDP group with the embeddings
sharded = copy.deepcopy(reference)
twin = copy.deepcopy(reference)
fused_loss.enable(reference)
for model in (sharded, twin):
    fused_loss.enable(model, "FSDP")
    for block in model.transformer.h:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
# `loop compare`/`loop bench` hash the initial weights of both sides; under FSDP2 they are DTensors (it called
# .numpy() on them, which fails for tensor subclasses): each rank hashes its own shards
initial = _weights_sha(sharded)
assert _weights_sha(twin) == initial
optimizers = [torch.optim.AdamW(m.parameters(), lr=1e-2) for m in (reference, sharded)]
g = torch.Generator().manual_seed(0)
worst = 0.0
for step in range(4):
    ids = torch.randint(0, 101, (4, 16), generator=g)
    labels = ids.clone()
    labels[:, 10:] = -100
    losses = []
    for model, opt in zip((reference, sharded), optimizers):
        model.train()
        out = model(input_ids=ids, labels=labels, num_items_in_batch=(labels[:, 1:] != -100).sum())
        assert out.logits.shape[-1] == 32  # the fused path: the head passed the hidden states (n_embd 32) through
        loss = out.loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.detach())
    worst = max(worst, abs(losses[0].item() - losses[1].item()) / losses[0].item())
assert _weights_sha(sharded) != initial
full = [p.full_tensor() for p in sharded.parameters()]
weights = max(((a - b).abs().max() / a.abs().max()).item() for a, b in zip(reference.parameters(), full))
assert worst <= 1e-6 and weights <= 1e-6, (worst, weights)
with torch.no_grad():  # evaluation goes through the model's own head: real logits
    sharded.eval()
    logits = sharded(input_ids=ids).logits
assert logits.shape == (4, 16, 101)
# an output layer wrapped as an FSDP unit of its own is resharded before the loss reads it: refused with one line
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402

from loop.errors import LoopError  # noqa: E402

untied = GPT2LMHeadModel(
    GPT2Config(vocab_size=101, n_positions=32, n_embd=32, n_layer=2, n_head=2, tie_word_embeddings=False)
)
fused_loss.enable(untied, "FSDP")
for module in (untied.lm_head, *untied.transformer.h, untied):
    fully_shard(module, mesh=mesh)
try:
    untied(input_ids=ids, labels=labels)
    raise AssertionError("a separately wrapped head was not refused")
except LoopError as e:
    assert "needs the output layer in the root FSDP unit" in str(e), e
print(f"rank {rank}: OK, loss rel diff {worst:.1e}, weights rel diff {weights:.1e} after 4 AdamW steps")
from loop.cli import leave_process_group  # noqa: E402

leave_process_group(0)  # a clean exit under torchrun (see loop/cli.py)
