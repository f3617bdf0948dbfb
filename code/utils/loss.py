"""Losses of the original ``utils/loss.py`` (docs/pipeline.md#losses; docs/methods.md#dhc (L1)-(L4);
Qn: docs/original-quirks.md).

Conventions kept from the original: the soft Dice term is ``-mean(dc)`` (negative, not 1 - Dice), batch dice sums
over batch *and* space, background is dropped, class weights multiply ``dc[1:]``, and the weighted CE is
``Σ w_t·nll / Σ w_t`` (so it is invariant to the scale of w while the weighted Dice term is not, Q33).
Changes: class weights may be lists, arrays or tensors on any device (Q1: the original called ``.cuda()``); an
all-zero-weight CE batch gives 0 instead of NaN and is counted (Q30); ``ignore_label`` does not modify the
caller's target in place.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from utils.device import at_least_fp32
from utils.io import ConfigError


def softmax_helper(x):
    return torch.softmax(at_least_fp32(x), 1)  # fp32 as under CUDA autocast


def _as_weight(weight):
    """Class weights as a float32 tensor (device kept for tensors), or None."""
    return None if weight is None else torch.as_tensor(weight, dtype=torch.float32)


def _one_hot_like(x, y):
    """``y`` as a one-hot tensor of ``x``'s shape and dtype: a label map [B,1,...] / [B,...] is scattered,
    a tensor already of x's shape is taken as one-hot."""
    if y.dim() != x.dim():
        y = y.view(y.shape[0], 1, *y.shape[1:])
    if y.shape == x.shape:
        return y.to(x.dtype)
    return torch.zeros_like(x).scatter_(1, y.long(), 1)


def get_tp_fp_fn_tn(x, y, axes=None, mask=None):
    """Soft TP = Σ x·y, FP = Σ x(1-y), FN = Σ (1-x)y, TN = Σ (1-x)(1-y) over ``axes`` (default: spatial).

    x: [B, C, ...] probabilities; y: label map or one-hot (see ``_one_hot_like``); mask: [B, 1, ...] or None
    (voxels with mask 0 count nowhere). FP, FN, TN come from the sums Σx, Σy, Σ1 minus TP (same values,
    a third of the element-wise work and saved tensors).
    """
    axes = tuple(range(2, x.dim())) if axes is None else tuple(axes)
    with torch.no_grad():
        y = _one_hot_like(x, y)
    m = torch.ones_like(x[:, :1]) if mask is None else mask
    xm = x if mask is None else x * mask
    tp = (xm * y).sum(axes)
    fp = xm.sum(axes) - tp
    fn = (y if mask is None else y * mask).sum(axes) - tp
    tn = m.sum(axes) - tp - fp - fn  # Σ(1-x)(1-y)m = Σm - TP - FP - FN
    return tp, fp, fn, tn


class _ClassWeighted(nn.Module):
    """Holds optional class weights; ``update_weight`` replaces them (DHC does so every iteration)."""

    def __init__(self, weight=None):
        super().__init__()
        self.weight = _as_weight(weight)

    def update_weight(self, weight):
        self.weight = _as_weight(weight)

    def _weight_on(self, ref):
        """The weights on ``ref``'s device (cached there, so a CPU-given weight is copied once) in its dtype."""
        if self.weight.device != ref.device:
            self.weight = self.weight.to(ref.device)
        return self.weight.to(ref.dtype)


class SoftDiceLoss(_ClassWeighted):
    """Soft Dice ``dc_c = (2TP + smooth) / (2TP + FP + FN + smooth + 1e-8)`` (docs/pipeline.md#losses).

    ``forward(x, y, loss_mask=None, is_training=True)``: x [B, C, ...] (``apply_nonlin`` applied first), y a
    label map or one-hot. Returns ``-mean(dc)`` when training, else the dc vector ([C'] with batch dice,
    [B, C'] without; C' = C - 1 unless ``do_bg``). Weights multiply ``dc[1:]``; only supported with
    ``batch_dice=True, do_bg=False`` (NotImplementedError otherwise, as the original).
    """

    def __init__(self, weight=None, apply_nonlin=None, batch_dice=True, do_bg=False, smooth=1.):
        super().__init__(weight)
        self.apply_nonlin, self.batch_dice, self.do_bg, self.smooth = apply_nonlin, batch_dice, do_bg, smooth

    def forward(self, x, y, loss_mask=None, is_training=True):
        axes = [0] + list(range(2, x.dim())) if self.batch_dice else list(range(2, x.dim()))
        if self.apply_nonlin is not None:
            x = self.apply_nonlin(x)
        tp, fp, fn, _ = get_tp_fp_fn_tn(at_least_fp32(x), y, axes, loss_mask)  # fp32 sums, as CUDA autocast's
        dc = (2 * tp + self.smooth) / (2 * tp + fp + fn + self.smooth + 1e-8)
        if not self.do_bg:
            dc = dc[1:] if self.batch_dice else dc[:, 1:]
        if self.weight is not None:
            if self.do_bg or not self.batch_dice:
                raise NotImplementedError("SoftDiceLoss weights need batch_dice=True and do_bg=False")
            dc = dc * self._weight_on(dc)[1:]  # foreground weights only
        return -dc.mean() if is_training else dc


def _safe_ratio(num, den):
    """num / den, and 0 where den == 0 (num is then 0 too), without a host sync; gradients stay finite."""
    return num / torch.where(den > 0, den, torch.ones_like(den))


class RobustCrossEntropyLoss(_ClassWeighted):
    """``nn.CrossEntropyLoss`` (mean) accepting a [B, 1, ...] float target; with weights Σ w_t·nll / Σ w_t (L1).

    Computed in fp32 even under autocast. Q30: if Σ w_t over the target voxels is 0 the original returns NaN;
    here it returns 0 and increments the ``zero_weight_batches`` buffer (a device tensor, no host sync).
    """

    def __init__(self, weight=None):
        super().__init__(weight)
        self.register_buffer("zero_weight_batches", torch.zeros((), dtype=torch.long))

    def forward(self, input, target):
        if target.dim() == input.dim():
            assert target.shape[1] == 1, f"expected a [B, 1, ...] target, got {tuple(target.shape)}"
            target = target[:, 0]
        target, logits = target.long(), at_least_fp32(input)
        if self.weight is None:
            return F.cross_entropy(logits, target)
        w = self._weight_on(logits)
        num = F.cross_entropy(logits, target, weight=w, reduction="sum")  # Σ w_t·nll
        den = w[target].sum()
        if self.zero_weight_batches.device != den.device:
            self.zero_weight_batches = self.zero_weight_batches.to(den.device)
        self.zero_weight_batches += den == 0
        return _safe_ratio(num, den)


class DC_and_CE_loss(nn.Module):
    """``weight_ce·CE_{w_ce} + weight_dice·SoftDice_{w_dc}`` (L3); Dice part: softmax, batch dice, no bg, smooth 1.

    ``log_dice`` uses -log(-dice). ``ignore_label``: voxels with that label are left out of both terms (CE averaged
    over the valid voxels, counted not weighted, as the original). ``update_weight(w)`` sets both weights.
    """

    def __init__(self, w_dc=None, w_ce=None, aggregate="sum", weight_ce=1, weight_dice=1, log_dice=False,
                 ignore_label=None):
        super().__init__()
        if aggregate != "sum":
            raise NotImplementedError(f"DC_and_CE_loss aggregate must be 'sum', got {aggregate!r}")
        self.weight_ce, self.weight_dice, self.log_dice = weight_ce, weight_dice, log_dice
        self.ignore_label = ignore_label
        self.ce = RobustCrossEntropyLoss(weight=w_ce)
        self.dc = SoftDiceLoss(weight=w_dc, apply_nonlin=softmax_helper)

    def update_weight(self, weight):
        self.dc.update_weight(weight)
        self.ce.update_weight(weight)

    def forward(self, net_output, target):
        if target.dim() != net_output.dim():
            target = target.unsqueeze(1)
        mask = None
        if self.ignore_label is not None:
            assert target.shape[1] == 1, "ignore_label needs a label map, not a one-hot target"
            valid = target != self.ignore_label
            target, mask = torch.where(valid, target, torch.zeros_like(target)), valid.float()
        dc_loss = self.dc(net_output, target, loss_mask=mask) if self.weight_dice != 0 else 0
        if self.log_dice:
            dc_loss = -torch.log(-dc_loss)
        if self.weight_ce == 0:
            ce_loss = 0
        elif mask is None:
            ce_loss = self.ce(net_output, target)
        else:
            logits = at_least_fp32(net_output)
            w = None if self.ce.weight is None else self.ce._weight_on(logits)
            nll = F.cross_entropy(logits, target[:, 0].long(), weight=w, reduction="none")  # w_t·nll per voxel
            ce_loss = _safe_ratio((nll * mask[:, 0]).sum(), mask.sum())
        return self.weight_ce * ce_loss + self.weight_dice * dc_loss


class WeightedCrossEntropyLoss(_ClassWeighted):
    """Per-voxel ``w_t·nll`` × optional detached ``weight_map`` [B, ...], then a plain mean over all voxels
    (not divided by Σw or by the map's sum; docs/methods.md#depl, #cld)."""

    def forward(self, input, target, weight_map=None):
        if target.dim() == input.dim():
            target = target[:, 0]
        logits = at_least_fp32(input)
        w = None if self.weight is None else self._weight_on(logits)
        loss = F.cross_entropy(logits, target.long(), weight=w, reduction="none")
        if weight_map is not None:
            loss = loss * weight_map.detach()
        return loss.mean()


def make_loss_function(name, weight=None):
    """The original's ``--sup_loss`` / ``--cps_loss`` choices; weights may be set later with ``update_weight``."""
    makers = {"ce": lambda: RobustCrossEntropyLoss(),
              "wce": lambda: RobustCrossEntropyLoss(weight=weight),
              "ce+dice": lambda: DC_and_CE_loss(),
              "wce+dice": lambda: DC_and_CE_loss(w_ce=weight),
              "w_ce+dice": lambda: DC_and_CE_loss(w_dc=weight, w_ce=weight)}
    if name not in makers:
        raise ConfigError(f"unknown loss {name!r}; choose one of {', '.join(makers)}")
    return makers[name]()


def hard_dice(pred, gt, num_cls, do_bg=False, smooth=1e-8, reduce=None):
    """Dice of hard label maps, summed over all given voxels: ``(2TP + s) / (2TP + FP + FN + s + 1e-8)``.

    pred, gt: integer tensors of one shape (one volume for the per-volume validation metric, Q35; a batch for
    DiffDW's batch Dice, docs/methods.md#dhc (F1)). Returns a float32 tensor of length C (do_bg) or C - 1 on pred's
    device. Equals the original's SoftDiceLoss(smooth=1e-8) on one-hots: a class absent from both scores 0.5.
    ``reduce`` (e.g. ``utils.distributed.all_reduce_sum``) combines the per-class counts before the division.
    Counts are exact integers (one-hot products are exact in fp32 below 2^24 voxels, as in the original).
    """
    if pred.shape != gt.shape:
        raise ValueError(f"hard_dice: pred {tuple(pred.shape)} and gt {tuple(gt.shape)} differ in shape")
    pred, gt = pred.reshape(-1).long(), gt.reshape(-1).long()

    def count(index, values):  # per-class sums by scatter_add: no one-hot tensor, no host sync
        return torch.zeros(num_cls, dtype=torch.long, device=index.device).scatter_add_(0, index, values)

    ones = torch.ones_like(pred)
    tp = count(gt, (pred == gt).long()).float()
    sizes = (count(pred, ones) + count(gt, ones)).float()  # = 2TP + FP + FN
    if reduce is not None:
        tp, sizes = reduce(torch.stack([tp, sizes])).unbind(0)
    dc = (2 * tp + smooth) / (sizes + smooth + 1e-8)
    return dc if do_bg else dc[1:]


def hard_dice_per_class(pred, gt, num_cls, smooth=1e-8):
    """Foreground hard Dice of one volume, length C - 1: the original's validation metric (Q35)."""
    return hard_dice(pred, gt, num_cls, do_bg=False, smooth=smooth)
