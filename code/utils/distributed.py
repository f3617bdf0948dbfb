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


def rank_from_env():
    """torchrun's RANK before the process group exists (0 without torchrun)."""
    return int(os.environ.get("RANK", 0))


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
        device = torch.device(device)
        torch.cuda.set_device(device if device.index is not None else torch.device("cuda", local_rank()))
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


def batch_mean(t, dim=0, keepdim=False):
    """Mean of ``t`` over ``dim`` of the global batch (every rank's rows): local sum and count, summed over ranks."""
    if world_size() == 1:
        return t.mean(dim=dim, keepdim=keepdim)
    total = all_reduce_sum(t.sum(dim=dim, keepdim=keepdim))
    return total / all_reduce_sum(torch.tensor(float(t.shape[dim]), device=t.device)).to(total.dtype)


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


def sync_buffers(module, src=0):
    """Copy rank ``src``'s buffers (BatchNorm running statistics) into every rank's ``module``. Parameters are not
    touched: averaged gradients and identical updates keep them equal on every rank by themselves."""
    if world_size() == 1:
        return
    with torch.no_grad():
        for t in module.buffers():
            dist.broadcast(t.data, src)


def shard(items):
    """This rank's share of ``items``: every world_size-th item starting at the rank (round robin)."""
    return list(items)[rank()::world_size()]


def average_gradients(modules):
    """What DDP's backward does, by hand after ``backward``: every parameter's gradient becomes the mean over ranks
    (a rank where a parameter got none contributes zeros; a parameter no rank used keeps ``grad = None``, so the
    optimiser skips it as in one process). For steps DDP's reducer cannot follow (inner ``autograd.grad``,
    submodules called outside the wrapper's forward, a data-dependent set of used parameters)."""
    if world_size() == 1:
        return
    params = [p for m in modules for p in m.parameters() if p.requires_grad]
    if not params:
        return
    device = params[0].device
    used = all_reduce_sum(torch.tensor([p.grad is not None for p in params], dtype=torch.int32, device=device))
    grads = []
    for p, n in zip(params, used.tolist()):
        if n and p.grad is None:
            p.grad = torch.zeros_like(p)
        if n:
            grads.append(p.grad)
    flat = torch._utils._flatten_dense_tensors(grads)
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= world_size()
    for g, mean in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
        g.copy_(mean)


class DDP(torch.nn.parallel.DistributedDataParallel):
    """DistributedDataParallel whose unknown attributes fall through to the wrapped module (``net.decoder``,
    ``net.normalization``), so a method's ``training_step`` can use a wrapped net like the bare one."""

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.module, name)


def wrap_nets(method, device, find_unused=False, sync_bn=False, by_hand=False):
    """{name: DDP wrapper} for the trained nets (bare modules stay in ``method.nets``), or None at world size 1 or
    with ``by_hand`` (then the engine calls ``average_gradients`` after backward instead). ``sync_bn`` converts
    BatchNorm to SyncBatchNorm in place first (CUDA only)."""
    if world_size() == 1:
        return None
    if sync_bn:
        for name, net in method.nets.items():
            method.nets[name] = torch.nn.SyncBatchNorm.convert_sync_batchnorm(net)
    if by_hand:
        return None
    wrappers = {}
    for name, net in method.nets.items():
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
