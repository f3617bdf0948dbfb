"""Schedules as pure functions of the epoch (docs/pipeline.md#schedules).

The original updates the LR and the unsupervised weight *after* each epoch, so epoch e trains with the values computed
for e - 1 (epochs 0 and 1 share the initial values, Q34 in docs/original-quirks.md).
``lr_at_epoch``/``unsup_weight_at_epoch`` return what epoch e actually trains with, so a resumed run needs no schedule
state.
"""
import math


def ema(current, past, momentum):
    """EMA(cur, past, m) = m * past + (1 - m) * cur."""
    return momentum * past + (1 - momentum) * current


def sigmoid_rampup(current, length):
    """exp(-5 (1 - clip(current, 0, length) / length)^2); 1 when length is 0."""
    if length == 0:
        return 1.0
    phase = 1.0 - min(max(float(current), 0.0), float(length)) / length
    return float(math.exp(-5.0 * phase * phase))


def poly_lr(epoch, max_epoch, base_lr, power=0.9):
    """base_lr * (1 - epoch / max_epoch)^power."""
    return base_lr * (1.0 - epoch / max_epoch) ** power


def lr_at_epoch(epoch, max_epoch, base_lr):
    """LR used while training epoch ``epoch`` (one-epoch lag: poly of max(e - 1, 0))."""
    return poly_lr(max(epoch - 1, 0), max_epoch, base_lr)


def unsup_weight_at_epoch(epoch, weight, rampup_length=None):
    """λ used while training epoch ``epoch``: weight * rampup(max(e - 1, 0)); ``weight`` when ramp-up is off."""
    if rampup_length is None:
        return float(weight)
    return weight * sigmoid_rampup(max(epoch - 1, 0), rampup_length)
