"""Multi-process training and inference under ``torchrun`` (PyTorch DistributedDataParallel).

Everything here is a no-op without a process group, so a plain ``python code/train_<m>.py`` run never touches
``torch.distributed``. Under ``torchrun`` (its environment: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) the
engine calls ``init_from_env`` once: gloo on CPU, NCCL on CUDA with one device per rank (``cuda:LOCAL_RANK``).

Method statistics that become state (class weights, thresholds, banks) go through ``all_reduce_sum`` /
``all_gather_cat`` so every rank holds the value one process would compute from the concatenated batch.
``ddp_nets`` swaps DistributedDataParallel wrappers into ``method.nets`` around ``training_step`` only: every other
hook (EMA updates, validation, checkpoints) sees the bare modules, so checkpoints carry no ``module.`` prefix.
"""
import contextlib
import datetime
import os

import torch
import torch.distributed as dist

# collectives wait this long for a slow rank (rank 0 validates alone); NCCL's default of 10 minutes is too short
TIMEOUT_MIN = float(os.environ.get("DHC_DDP_TIMEOUT_MIN", "120"))


def launched_by_torchrun():
    """True when torchrun's environment is present (also for a 1-process torchrun)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def local_rank():
    return int(os.environ.get("LOCAL_RANK", 0))


def is_initialized():
    return dist.is_available() and dist.is_initialized()


def rank():
    return dist.get_rank() if is_initialized() else 0


def world_size():
    return dist.get_world_size() if is_initialized() else 1


def is_main():
    """Rank 0, or the only process: the one that logs and writes files."""
    return rank() == 0


def init_from_env(device):
    """Start the process group from torchrun's environment (no-op otherwise or when already started)."""
    if not launched_by_torchrun() or is_initialized():
        return
    backend = "nccl" if torch.device(device).type == "cuda" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(torch.device(device))
    dist.init_process_group(backend, timeout=datetime.timedelta(minutes=TIMEOUT_MIN))


def shutdown():
    if is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(t):
    """Sum of ``t`` over ranks (a new tensor; ``t`` itself without a process group)."""
    if world_size() == 1:
        return t
    out = t.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def all_reduce_mean(t):
    """Mean of a floating tensor over ranks (equal weight per rank: equal per-rank batches)."""
    if world_size() == 1:
        return t
    return all_reduce_sum(t) / world_size()


def all_gather_cat(t, dim=0):
    """Concatenation of every rank's ``t`` along ``dim`` in rank order; sizes along ``dim`` may differ."""
    if world_size() == 1:
        return t
    t = t.detach().contiguous()
    sizes = [torch.zeros(1, dtype=torch.long, device=t.device) for _ in range(world_size())]
    dist.all_gather(sizes, torch.tensor([t.shape[dim]], dtype=torch.long, device=t.device))
    sizes = [int(s) for s in sizes]
    top = max(sizes)
    if t.shape[dim] < top:  # all_gather needs equal shapes: pad, then cut
        pad_shape = list(t.shape)
        pad_shape[dim] = top - t.shape[dim]
        t = torch.cat([t, t.new_zeros(pad_shape)], dim)
    parts = [torch.empty_like(t) for _ in sizes]
    dist.all_gather(parts, t)
    return torch.cat([p.narrow(dim, 0, n) for p, n in zip(parts, sizes)], dim)


def broadcast(t, src=0):
    """``t`` as rank ``src`` holds it (in place; returned)."""
    if world_size() > 1:
        dist.broadcast(t, src)
    return t


def all_true(flag, device="cpu"):
    """Whether ``flag`` (bool or 0-d tensor) holds on every rank."""
    if world_size() == 1:
        return bool(flag)
    t = torch.as_tensor(flag, device=device).detach().to(torch.int32).reshape(1)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def gather_objects(obj):
    """[every rank's ``obj``] in rank order (pickled; for small host objects such as RNG states)."""
    if world_size() == 1:
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier():
    if world_size() > 1:
        dist.barrier()


def sync_module_state(module, src=0):
    """Copy rank ``src``'s parameters and buffers (BatchNorm running statistics) into every rank's ``module``."""
    if world_size() == 1:
        return
    with torch.no_grad():
        for t in (*module.parameters(), *module.buffers()):
            dist.broadcast(t.data, src)


def shard(items):
    """This rank's share of ``items``: every world_size-th item starting at the rank (round robin)."""
    return list(items)[rank()::world_size()]


class DDP(torch.nn.parallel.DistributedDataParallel):
    """DistributedDataParallel whose unknown attributes fall through to the wrapped module (``net.decoder``,
    ``net.normalization``), so a method's ``training_step`` can use a wrapped net like the bare one."""

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.module, name)


def wrap_nets(method, device, find_unused=False, sync_bn=False):
    """{name: DDP wrapper} for the trained nets (bare modules stay in ``method.nets``), or None at world size 1.
    ``sync_bn`` converts BatchNorm to SyncBatchNorm in place first (CUDA only)."""
    if world_size() == 1:
        return None
    wrappers = {}
    for name, net in method.nets.items():
        if sync_bn:
            method.nets[name] = net = torch.nn.SyncBatchNorm.convert_sync_batchnorm(net)
        ids = [device.index if device.index is not None else local_rank()] if device.type == "cuda" else None
        wrappers[name] = DDP(net, device_ids=ids, find_unused_parameters=find_unused)
    return wrappers


@contextlib.contextmanager
def ddp_nets(method, wrappers):
    """Inside: ``method.nets`` holds the DDP wrappers (gradients are averaged over ranks in backward)."""
    if not wrappers:
        yield
        return
    bare = method.nets
    method.nets = dict(wrappers)
    try:
        yield
    finally:
        method.nets = bare
