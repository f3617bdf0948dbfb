"""Device choice and module placement, shared by training and inference."""
import torch

from utils.io import ConfigError


def resolve_device(device, gpu="0"):
    """``auto`` -> ``cuda:<gpu>`` when CUDA is available, else CPU; explicit names are checked."""
    if device == "auto":
        return torch.device(f"cuda:{gpu}" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"--device {device!r}: expected auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: CUDA is not available on this machine")
    return dev


def place_module(module, device, channels_last=False):
    """Move ``module`` to ``device``. ``channels_last`` (inference on CPU only) switches to channels-last-3d so
    oneDNN picks its faster 3-D kernels: 1.2-1.5x in bench_inference, outputs equal to ~3e-8. Not for training:
    its weight gradients differ from a float64 reference by up to 7 % of their scale (0.55 % contiguous)."""
    module = module.to(device)
    if channels_last and torch.device(device).type == "cpu":
        module = module.to(memory_format=torch.channels_last_3d)
    return module


def at_least_fp32(x):
    """``x`` in float32 when it is fp16/bf16 (autocast), unchanged when fp32/fp64.

    CUDA autocast runs softmax, log, exp, pow and sums in fp32, CPU autocast keeps them in fp16 (where, e.g., the
    log of an underflowed softmax is -inf). Losses and statistics pass network outputs through this before such ops,
    so their numerics do not depend on the device's autocast lists: on CUDA it changes nothing, and ``--amp`` on the
    CPU computes them as CUDA does (docs/pipeline.md#schedules)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))
