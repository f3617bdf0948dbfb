"""Losses against hand formulas (docs/pipeline.md#losses; docs/methods.md#dhc (L1)-(L4), #fully, #cps;
Q30 in docs/original-quirks.md)."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from utils.io import ConfigError
from utils.loss import (DC_and_CE_loss, RobustCrossEntropyLoss, SoftDiceLoss, WeightedCrossEntropyLoss,
                        get_tp_fp_fn_tn, hard_dice, hard_dice_per_class, make_loss_function)

C = 3


def sample(seed=0, shape=(2, C, 2, 3, 4)):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(shape, generator=g, dtype=torch.float64)
    labels = torch.randint(0, shape[1], (shape[0], 1, *shape[2:]), generator=g)
    return logits, labels


def np_softmax(z):
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def hand_dice(p, y, batch_dice, smooth=1.0):
    """dc[(b,) c] = (2TP + s) / (2TP + FP + FN + s + 1e-8) with explicit loops over samples and classes."""
    B, n_cls = p.shape[:2]
    tp, fp, fn = (np.zeros((B, n_cls)) for _ in range(3))
    for b in range(B):
        for c in range(n_cls):
            g = (y[b, 0] == c).astype(float)
            tp[b, c] = (p[b, c] * g).sum()
            fp[b, c] = (p[b, c] * (1 - g)).sum()
            fn[b, c] = ((1 - p[b, c]) * g).sum()
    if batch_dice:
        tp, fp, fn = tp.sum(0), fp.sum(0), fn.sum(0)
    return (2 * tp + smooth) / (2 * tp + fp + fn + smooth + 1e-8)


def hand_ce(z, y, w=None):
    """Σ_i w_{t_i}·nll_i / Σ_i w_{t_i} over all voxels i."""
    p = np_softmax(z)
    num = den = 0.0
    for idx in np.ndindex(y[:, 0].shape):
        t = y[idx[0], 0][idx[1:]]
        wt = 1.0 if w is None else w[t]
        num += wt * -np.log(p[(idx[0], t) + idx[1:]])
        den += wt
    return num / den


def test_tp_fp_fn_tn_label_map_and_one_hot():
    x, y = sample(1)
    x = x.softmax(1)
    onehot = F.one_hot(y[:, 0], C).permute(0, 4, 1, 2, 3).double()
    ref = [(x * onehot).sum((2, 3, 4)), (x * (1 - onehot)).sum((2, 3, 4)),
           ((1 - x) * onehot).sum((2, 3, 4)), ((1 - x) * (1 - onehot)).sum((2, 3, 4))]
    for target in (y, y[:, 0], onehot):  # [B,1,...], [B,...] label maps and a one-hot of x's shape
        for got, want in zip(get_tp_fp_fn_tn(x, target, (2, 3, 4)), ref):
            torch.testing.assert_close(got, want)
    mask = (torch.arange(24).view(1, 1, 2, 3, 4) % 3 != 0).double().expand(2, 1, 2, 3, 4)
    tp, fp, fn, tn = get_tp_fp_fn_tn(x, y, (0, 2, 3, 4), mask)
    torch.testing.assert_close(tn, ((1 - x) * (1 - onehot) * mask).sum((0, 2, 3, 4)))
    torch.testing.assert_close(fp, (x * (1 - onehot) * mask).sum((0, 2, 3, 4)))


@pytest.mark.parametrize("batch_dice, do_bg, smooth", [(True, False, 1.0), (False, False, 1.0), (True, True, 1.0),
                                                       (False, True, 1e-5), (True, False, 0.0)])
def test_soft_dice_matches_hand_formula(batch_dice, do_bg, smooth):
    z, y = sample(2)
    dc = hand_dice(np_softmax(z.numpy()), y.numpy(), batch_dice, smooth)
    dc = dc if do_bg else (dc[1:] if batch_dice else dc[:, 1:])
    loss = SoftDiceLoss(apply_nonlin=lambda t: t.softmax(1), batch_dice=batch_dice, do_bg=do_bg, smooth=smooth)
    torch.testing.assert_close(loss(z, y, is_training=False), torch.from_numpy(dc))
    torch.testing.assert_close(loss(z, y), torch.tensor(-dc.mean(), dtype=torch.float64))


def test_soft_dice_weights_multiply_foreground_and_scale_linearly():
    z, y = sample(3)
    w = np.array([5.0, 0.5, 2.0])
    dc = hand_dice(np_softmax(z.numpy()), y.numpy(), True)
    loss = SoftDiceLoss(weight=w, apply_nonlin=lambda t: t.softmax(1))
    want = -(w[1:] * dc[1:]).mean()  # Dice_w = -(1/(C-1)) Σ_{c≥1} w_c dc_c; w[0] unused
    torch.testing.assert_close(loss(z, y), torch.tensor(want, dtype=torch.float64))
    loss.update_weight(torch.tensor(w) * 10)
    torch.testing.assert_close(loss(z, y), torch.tensor(10 * want, dtype=torch.float64))  # not scale-invariant (Q33)
    torch.testing.assert_close(loss(z, y, is_training=False), torch.from_numpy(10 * w[1:] * dc[1:]))


@pytest.mark.parametrize("batch_dice, do_bg", [(True, True), (False, False), (False, True)])
def test_soft_dice_weights_unsupported_combinations(batch_dice, do_bg):
    z, y = sample(4)
    with pytest.raises(NotImplementedError):
        SoftDiceLoss(weight=[1, 1, 1], batch_dice=batch_dice, do_bg=do_bg)(z.softmax(1), y)


def test_weighted_ce_formula_and_scale_invariance():
    z, y = sample(5)
    w = [0.2, 1.0, 3.0]
    want = hand_ce(z.numpy(), y.numpy(), w)
    ce = RobustCrossEntropyLoss(weight=w)
    torch.testing.assert_close(ce(z, y), torch.tensor(want, dtype=torch.float64))
    torch.testing.assert_close(ce(z, y.float()), ce(z, y[:, 0]))  # [B,1,...] float target squeezed
    ce.update_weight(np.array(w) * 10)
    torch.testing.assert_close(ce(z, y), torch.tensor(want, dtype=torch.float64))  # ×10 cancels (L1)
    torch.testing.assert_close(RobustCrossEntropyLoss()(z, y), torch.tensor(hand_ce(z.numpy(), y.numpy()),
                                                                            dtype=torch.float64))


def test_dc_and_ce_matches_hand_formula_and_update_weight():
    """S_w = CE_w + Dice_w on random logits (docs/methods.md#dhc (L3); #cps unweighted)."""
    z, y = sample(6)
    w = np.array([0.7, 1.3, 2.9])
    p = np_softmax(z.numpy())
    dc = hand_dice(p, y.numpy(), True)
    s_w = hand_ce(z.numpy(), y.numpy(), w) - (w[1:] * dc[1:]).mean()
    s = hand_ce(z.numpy(), y.numpy()) - dc[1:].mean()
    assert abs(DC_and_CE_loss(w_dc=w, w_ce=w)(z, y).item() - s_w) < 1e-6
    assert abs(DC_and_CE_loss()(z, y[:, 0]).item() - s) < 1e-6
    loss = DC_and_CE_loss()
    loss.update_weight(torch.tensor(w))
    assert torch.equal(loss.dc.weight, loss.ce.weight) and loss.dc.weight.tolist() == pytest.approx(w.tolist())
    assert abs(loss(z, y).item() - s_w) < 1e-6
    assert abs(DC_and_CE_loss(weight_ce=0.5, weight_dice=2)(z, y).item()
               - (0.5 * hand_ce(z.numpy(), y.numpy()) - 2 * dc[1:].mean())) < 1e-6
    log_dice = DC_and_CE_loss(log_dice=True)(z, y).item()
    assert abs(log_dice - (hand_ce(z.numpy(), y.numpy()) - np.log(dc[1:].mean()))) < 1e-6


@pytest.mark.parametrize("as_type", [list, np.array, torch.tensor])
def test_weight_types_give_the_same_loss(as_type):
    z, y = sample(7)
    w = [0.5, 1.5, 3.0]
    ref = DC_and_CE_loss(w_dc=torch.tensor(w), w_ce=torch.tensor(w))(z, y)
    torch.testing.assert_close(DC_and_CE_loss(w_dc=as_type(w), w_ce=as_type(w))(z, y), ref)
    # float32 weights on float64 logits: moved to the input's dtype for the Dice part
    assert DC_and_CE_loss(w_dc=as_type(w), w_ce=as_type(w)).dc.weight.dtype == torch.float32


def test_near_perfect_logits():
    """±20 one-hot logits, every class present: CE ≈ 0, Dice ≈ -1, total ≈ -1 (docs/methods.md#fully)."""
    _, y = sample(8)
    y[0, 0, 0, 0, :C] = torch.arange(C)
    z = 40 * F.one_hot(y[:, 0], C).permute(0, 4, 1, 2, 3).float() - 20
    loss = DC_and_CE_loss()
    assert loss.ce(z, y).item() < 1e-8
    assert abs(loss.dc(z, y).item() + 1) < 1e-6
    assert abs(loss(z, y).item() + 1) < 1e-6


def test_zero_weight_batch_returns_zero_with_finite_grad():
    """Q30: Σ w_t = 0 over the target voxels → 0 instead of NaN, counted on the device."""
    z, _ = sample(9)
    z = z.float().requires_grad_()
    y = torch.zeros(2, 1, 2, 3, 4, dtype=torch.long)  # all background, background weight 0
    ce = RobustCrossEntropyLoss(weight=[0.0, 1.0, 2.0])
    loss = ce(z, y)
    assert loss.item() == 0.0 and ce.zero_weight_batches.item() == 1
    loss.backward()
    assert torch.isfinite(z.grad).all() and z.grad.abs().sum() == 0
    y[0, 0, 0, 0, 0] = 2  # one weighted voxel: the normal formula, counter unchanged
    assert ce(z, y).item() == pytest.approx(-F.log_softmax(z[0, :, 0, 0, 0], 0)[2].item(), rel=1e-6)
    assert ce.zero_weight_batches.item() == 1
    sup = DC_and_CE_loss(w_dc=[0.0, 1.0, 2.0], w_ce=[0.0, 1.0, 2.0])
    total = sup(z, torch.zeros_like(y))
    assert torch.isfinite(total) and sup.ce.zero_weight_batches.item() == 1


def test_ce_is_fp32_under_autocast():
    z, y = sample(10)
    ce = RobustCrossEntropyLoss(weight=[1.0, 2.0, 3.0])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ce(z.bfloat16(), y)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ce(z.bfloat16().float(), y))


def test_ignore_label():
    """Ignored voxels count in neither term; CE is averaged over the valid voxels (docs/pipeline.md#losses)."""
    z, y = sample(11)
    y[0, 0, 0] = 255
    kept = (y != 255)
    original = y.clone()
    y0 = torch.where(kept, y, torch.zeros_like(y))
    nll = -F.log_softmax(z, 1).gather(1, y0)
    ce = (nll * kept).sum() / kept.sum()
    p = z.softmax(1)
    onehot = F.one_hot(y0[:, 0], C).permute(0, 4, 1, 2, 3).double()
    m = kept.double()
    tp, fp, fn = ((p * onehot * m).sum((0, 2, 3, 4)), (p * (1 - onehot) * m).sum((0, 2, 3, 4)),
                  ((1 - p) * onehot * m).sum((0, 2, 3, 4)))
    dc = (2 * tp + 1) / (2 * tp + fp + fn + 1 + 1e-8)
    torch.testing.assert_close(DC_and_CE_loss(ignore_label=255)(z, y), ce - dc[1:].mean())
    assert torch.equal(y, original)  # the caller's target is not modified


def test_weighted_cross_entropy_plain_mean():
    z, y = sample(12)
    w = torch.tensor([0.5, 2.0, 4.0])
    wmap = torch.rand(2, 2, 3, 4, generator=torch.Generator().manual_seed(0))
    nll = -F.log_softmax(z, 1).gather(1, y)[:, 0]
    wt = w.double()[y[:, 0]]
    torch.testing.assert_close(WeightedCrossEntropyLoss(weight=w)(z, y), (wt * nll).mean())  # not / Σw
    torch.testing.assert_close(WeightedCrossEntropyLoss()(z, y[:, 0], weight_map=wmap), (wmap * nll).mean())


def test_make_loss_function():
    w = [1.0, 2.0, 3.0]
    assert isinstance(make_loss_function("wce", w), RobustCrossEntropyLoss)
    both = make_loss_function("w_ce+dice", w)
    assert both.dc.weight.tolist() == w and both.ce.weight.tolist() == w
    ce_only = make_loss_function("wce+dice", w)
    assert ce_only.dc.weight is None and ce_only.ce.weight.tolist() == w
    assert make_loss_function("ce+dice").ce.weight is None
    with pytest.raises(ConfigError, match="w_ce\\+dice"):
        make_loss_function("dice")
    with pytest.raises(NotImplementedError):
        DC_and_CE_loss(aggregate="mean")


def test_hard_dice():
    gt = torch.tensor([[0, 1, 1], [2, 2, 0]])
    pred = torch.tensor([[0, 1, 2], [2, 2, 1]])
    # class 1: TP 1, FP 1, FN 1 → 2/4; class 2: TP 2, FP 1, FN 0 → 4/5; class 3 absent from both → 0.5
    torch.testing.assert_close(hard_dice_per_class(pred, gt, 4), torch.tensor([0.5, 0.8, 0.5]))
    # background: TP 1, FN 1 → 2/3
    torch.testing.assert_close(hard_dice(pred, gt, 4, do_bg=True), torch.tensor([2 / 3, 0.5, 0.8, 0.5]))
    assert hard_dice(gt, gt, 4).tolist() == [1.0, 1.0, 0.5]
    # classes 1, 2 absent from both → 0.5; class 3 only missed (FN 5) → 1e-8 / (5 + 2e-8) ≈ 0
    torch.testing.assert_close(hard_dice(torch.zeros(5, dtype=torch.long), torch.full((5,), 3), 4),
                               torch.tensor([0.5, 0.5, 2e-9]))


def test_hard_dice_equals_soft_dice_on_one_hots():
    """The original's metric: SoftDiceLoss(smooth=1e-8) on one-hots, is_training=False (batch, bg per flag)."""
    g = torch.Generator().manual_seed(13)
    pred, gt = torch.randint(0, 4, (2, 4, 6, 6), generator=g), torch.randint(0, 3, (2, 4, 6, 6), generator=g)
    onehot = F.one_hot(pred, 4).permute(0, 4, 1, 2, 3).float()
    for do_bg in (False, True):
        ref = SoftDiceLoss(smooth=1e-8, do_bg=do_bg)(onehot, gt.unsqueeze(1), is_training=False)
        torch.testing.assert_close(hard_dice(pred, gt, 4, do_bg=do_bg), ref, rtol=0, atol=0)
    with pytest.raises(ValueError, match="shape"):
        hard_dice(pred, gt[0], 4)
