"""DistributedDataParallel with ctclab's loss: 2 processes (gloo, loopback, file rendezvous) give the same
averaged gradients as one process on the concatenated batch, for each reduction."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import ctclab

T, B, C, F_IN = 12, 3, 5, 4


def model_and_data(seed=0):
    g = torch.Generator().manual_seed(seed)
    model = torch.nn.Linear(F_IN, C)
    with torch.no_grad():
        model.weight.copy_(torch.randn(C, F_IN, generator=g))
        model.bias.copy_(torch.randn(C, generator=g))
    features = torch.randn(T, 2 * B, F_IN, generator=g)
    targets = torch.randint(1, C, (2 * B, 4), generator=g)
    il = torch.randint(8, T + 1, (2 * B,), generator=g)
    tl = torch.randint(1, 5, (2 * B,), generator=g)
    return model, features, targets, il, tl


def loss_of(model, features, targets, il, tl, reduction):
    loss = ctclab.ctc_loss(model(features).log_softmax(-1), targets, il, tl, reduction=reduction)
    return loss.sum() if reduction == "none" else loss


def worker(rank, rendezvous, reduction, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=2)
    model, features, targets, il, tl = model_and_data()
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    part = slice(rank * B, (rank + 1) * B)
    loss_of(ddp, features[:, part], targets[part], il[part], tl[part], reduction).backward()
    if rank == 0:
        torch.save([p.grad for p in ddp.parameters()], out)
    dist.barrier()  # neither rank tears gloo down while the other still talks to it
    dist.destroy_process_group()
    # skip interpreter teardown: under pytest a C++ thread of the child is now and then still
    # joinable at exit ("terminate called without an active exception"); the work is done
    os._exit(0)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_ddp_gradients_equal_single_process_on_the_whole_batch(reduction, tmp_path):
    out = str(tmp_path / "grads.pt")
    mp.spawn(worker, args=(str(tmp_path / "rendezvous"), reduction, out), nprocs=2, join=True)
    ddp_grads = torch.load(out)
    model, features, targets, il, tl = model_and_data()
    loss_of(model, features, targets, il, tl, reduction).backward()
    # DDP averages over the 2 ranks: equal for 'mean' (each rank's mean over B items), half the
    # whole-batch gradient for 'sum' (and 'none' summed)
    scale = 1.0 if reduction == "mean" else 0.5
    for got, p in zip(ddp_grads, model.parameters()):
        torch.testing.assert_close(got, scale * p.grad)
