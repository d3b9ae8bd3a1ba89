"""DistributedDataParallel over the reversible GPT: two gloo processes on CPU produce the
gradients of one process on the global batch (DESIGN 6: re-entrant backward vs DDP hooks)."""
import gc
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import revkernels as rk

CFG = dict(vocab_size=32, seq_len=8, d_model=16, n_heads=2, n_layers=3)


def _batch():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 32, (4, 8), generator=g), torch.randint(0, 32, (4, 8), generator=g)


def _train(rank, arch):
    """The DDP gradients of this rank after two steps on its half of the batch."""
    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(rk.GPT(rk.GPTConfig(arch=arch, **CFG)))
    idx, targets = _batch()
    part = slice(rank * 2, rank * 2 + 2)
    for _ in range(2):   # two steps: the second checks DDP's buckets are reset after a reversible backward
        model.zero_grad()
        model(idx[part], targets[part])[1].backward()
    return {n: p.grad for n, p in model.module.named_parameters()}


def _worker(rank, world, init_file, arch, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    grads = _train(rank, arch)          # the DDP wrapper (and its pending gloo work) is gone on return
    if rank == 0:
        torch.save(grads, os.path.join(out_dir, "ddp.pt"))
    gc.collect()
    dist.barrier()   # both ranks leave together: gloo aborts a process torn down while its peer still talks
    dist.destroy_process_group()


@pytest.mark.parametrize("arch", ["midpoint", "hamiltonian"])
def test_ddp_gradients_equal_single_process(tmp_path, arch):
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), arch, str(tmp_path)), nprocs=2, join=True)
    ddp = torch.load(tmp_path / "ddp.pt")
    torch.manual_seed(0)
    model = rk.GPT(rk.GPTConfig(arch=arch, **CFG))
    idx, targets = _batch()
    model(idx, targets)[1].backward()
    for name, p in model.named_parameters():
        # The mean of two half-batch losses equals the global-batch loss: only fp32 summation order differs.
        torch.testing.assert_close(ddp[name], p.grad, rtol=1e-5, atol=1e-7, msg=name)
