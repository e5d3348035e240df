"""loop/zero.py in one process (a gloo group of 1): the sharded optimizer's step is the plain optimizer's step, and the
caller's parameters are handed back without its hooks or gradient views. The 2-process numerics and resume are in
tests/integration/test_distributed.py."""

import socket

import pytest
import torch
import torch.distributed as dist
from helpers import clone, tiny_gpt2

from loop.zero import ShardedOptimizer


@pytest.fixture
def group_of_one():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _groups(model):
    decay = [p for n, p in model.named_parameters() if "ln" not in n and "bias" not in n]
    rest = [p for n, p in model.named_parameters() if "ln" in n or "bias" in n]
    return [{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}]


def test_sharded_steps_equal_the_plain_optimizer_and_the_parameters_are_handed_back(group_of_one):
    plain_model = tiny_gpt2()
    sharded_model = clone(plain_model)
    plain = torch.optim.AdamW(_groups(plain_model), lr=1e-2)
    sharded = ShardedOptimizer(sharded_model, torch.optim.AdamW(_groups(sharded_model), lr=1e-2), None, bucket_mb=0.01)
    assert len(sharded.buckets) > 2  # several buckets a group at 10 KB each
    assert [g["weight_decay"] for g in sharded.optimizer.param_groups] == [0.1, 0.0]
    batch = torch.randint(0, 64, (2, 16))
    # three steps measuring the norm only (the optimizers then see the same gradients: the same parameters to the
    # bit), then one clipped at 0.5 (the clip coefficient from the two norms, equal to fp32 rounding)
    for max_norm in (float("inf"), float("inf"), float("inf"), 0.5):
        plain_model(input_ids=batch, labels=batch).loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(plain_model.parameters(), max_norm)
        plain.step()
        plain.zero_grad()
        # the hooks send each bucket during the backward; then clip, step (which gathers) and zero in place
        sharded.reducing = True
        sharded_model(input_ids=batch, labels=batch).loss.backward()
        assert all(b.work is not None for b in sharded.buckets)  # sent by the hooks, before wait()
        sharded_norm = sharded.clip_(max_norm)
        sharded.optimizer.step()
        sharded.zero_grad()
        assert abs(float(norm) - float(sharded_norm)) <= 1e-6 * float(norm)
        for p, q in zip(plain_model.parameters(), sharded_model.parameters()):
            if max_norm == float("inf"):
                assert torch.equal(p, q)
            else:
                assert torch.allclose(p, q, rtol=1e-5, atol=1e-6)
    p = next(sharded_model.parameters())
    buffer = sharded.of[p].buffer  # between steps the gradients are views of the buckets
    assert p.grad is not None and p.grad.untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr()
    sharded.remove()
    assert all(p.grad is None for p in sharded_model.parameters())
    assert all(not getattr(p, "_post_accumulate_grad_hooks", None) for p in sharded_model.parameters())


def test_ddps_wrapper_is_dropped_only_where_it_does_nothing(group_of_one):
    """With the sharded optimizer DDP's wrapper only holds a second copy of the gradients; it stays where it still
    works: a model with buffers (broadcast before forwards), or a compiled model whose graph dynamo splits at DDP's
    buckets (ddp_compile_overlap, torch's default). Dropped, the module (compiled again where the wrapper was) takes
    its place in accelerate's list, and the wrapper is freed."""
    import gc
    import weakref
    from types import SimpleNamespace

    from transformers import BertConfig, BertModel

    from loop.fit import ddp_wrapper_unneeded, module_without_ddp

    gpt2 = torch.nn.parallel.DistributedDataParallel(tiny_gpt2())
    bert = torch.nn.parallel.DistributedDataParallel(
        BertModel(BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2))
    )
    quiet_bert = torch.nn.parallel.DistributedDataParallel(bert.module, broadcast_buffers=False)

    def run(model, overlap=None):
        return SimpleNamespace(model=model, fast=SimpleNamespace(ddp_compile_overlap=overlap))

    assert ddp_wrapper_unneeded(run(gpt2), gpt2)
    assert not ddp_wrapper_unneeded(run(bert), bert)  # position_ids and token_type_ids buffers
    assert ddp_wrapper_unneeded(run(quiet_bert), quiet_bert)
    compiled = torch.compile(gpt2)
    assert not ddp_wrapper_unneeded(run(compiled), gpt2)  # torch's default: optimize_ddp splits the graph
    assert not ddp_wrapper_unneeded(run(compiled, overlap=True), gpt2)
    assert ddp_wrapper_unneeded(run(compiled, overlap=False), gpt2)  # one graph (`fast`): nothing for DDP to do

    plugin = SimpleNamespace(use_regional_compilation=False, to_kwargs=lambda: {"dynamic": False})
    acc = SimpleNamespace(state=SimpleNamespace(dynamo_plugin=plugin), _models=[compiled])
    module = gpt2.module
    again = module_without_ddp(acc, compiled, gpt2)
    assert again._orig_mod is module and acc._models == [again]
    assert not hasattr(module, "_is_accelerate_prepared")  # the caller's module is left as it was
    acc._models = [gpt2]
    assert module_without_ddp(acc, gpt2, gpt2) is module and acc._models == [module]
    gone = weakref.ref(gpt2)
    del gpt2, compiled, acc
    gc.collect()
    assert gone() is None
