"""simis (docs/methods.md#simis): the gap-to-the-head weights C·(max P − P_c) against hand computation, the
init as one EMA step from C·1, the EMA from each net's own argmax over the whole batch, both losses weighted."""
import numpy as np
import pytest
import torch

from cotraining_helpers import C, check_weighted_step, make_method
from train_simis import SimiS, SimiSCoTraining
from utils.loss import RobustCrossEntropyLoss, SoftDiceLoss, softmax_helper


def simis_reference(counts):
    """W(N) = K·(max P − P), P = (N + ε)/(Σ N + ε), K = len(N)."""
    counts = np.asarray(counts, dtype=np.float64)
    share = (counts + 1e-8) / (counts.sum() + 1e-8)
    return len(counts) * (share.max() - share)


def simis_init_reference(counts):
    return 0.99 * len(counts) + 0.01 * simis_reference(counts)


def test_weights_of_a_known_histogram_and_the_init_step():
    # N = [900, 50, 30, 20], K = 4: P = [.9, .05, .03, .02] -> cur = 4·(.9 − P) = [0, 3.4, 3.48, 3.52];
    # init = 0.99·4 + 0.01·cur
    simis = SimiS(4, momentum=0.99)
    assert np.allclose(simis._cal_weights(torch.tensor([900, 50, 30, 20])).numpy(), [0, 3.4, 3.48, 3.52])
    w = simis.init_weights([np.repeat(np.arange(4), [900, 50, 30, 20])])
    assert np.allclose(w.numpy(), 0.99 * 4 + 0.01 * np.array([0, 3.4, 3.48, 3.52]), atol=1e-6)
    assert (SimiS(4).momentum, SimiS(4).do_bg) == (0.95, False)  # SimiS(num_cls, do_bg=False, momentum=0.95)


def test_head_class_gets_zero_and_all_weights_lie_in_0_k():
    rng = np.random.default_rng(2)
    simis = SimiS(C)
    for _ in range(10):
        counts = rng.integers(0, 10000, C)
        cur = simis._cal_weights(torch.as_tensor(counts))
        assert cur[counts.argmax()] == 0 and (cur >= 0).all() and cur.max() <= C
        assert np.allclose(cur.numpy(), simis_reference(counts), rtol=1e-5, atol=1e-6)


def test_ema_from_logits_and_majority_weight_decays():
    simis = SimiS(3, momentum=0.99)
    w = simis.init_weights([np.repeat(np.arange(3), [6, 1, 1])]).clone()
    logits = torch.nn.functional.one_hot(torch.tensor([0] * 6 + [1, 2]), 3).T.float().reshape(1, 3, 2, 2, 2)
    for _ in range(3):  # histogram [6, 1, 1]: cur = 3·(0.75 − [0.75, 0.125, 0.125]) = [0, 1.875, 1.875]
        w = 0.99 * w + 0.01 * torch.tensor([0, 1.875, 1.875])
        got = simis.get_ema_weights(logits)
    assert got.device == logits.device and torch.allclose(got, w, atol=1e-6)
    assert got[0].item() == pytest.approx(0.99 ** 4 * 3)  # the head class only decays: 0.99^(1 + 3 steps)·K


def test_weighted_ce_is_scale_invariant_and_weighted_dice_scales_linearly():
    g = torch.Generator().manual_seed(0)
    z, y = torch.randn(2, 4, 2, 4, 4, generator=g), torch.randint(0, 4, (2, 1, 2, 4, 4), generator=g)
    w = torch.tensor([0.5, 1.0, 2.0, 3.0])
    ce = [RobustCrossEntropyLoss(weight=s * w)(z, y).item() for s in (1, 7)]
    dice = [SoftDiceLoss(weight=s * w, apply_nonlin=softmax_helper)(z, y).item() for s in (1, 7)]
    assert ce[1] == pytest.approx(ce[0], rel=1e-6) and dice[1] == pytest.approx(7 * dice[0], rel=1e-6)


def test_step_weights_from_own_whole_batch_enter_both_losses():
    check_weighted_step(SimiSCoTraining, simis_reference, labeled_init=simis_init_reference, count_labeled=True)


def test_targets_all_of_zero_weight_give_zero_not_nan_and_are_counted():
    # the head class has weight 0 after the EMA drives it down; a batch whose targets are all that class gives
    # 0/0 in the original (NaN); here the term is 0 and counted
    method = make_method(SimiSCoTraining)
    loss = method.cps_losses["A"]
    loss.update_weight(torch.tensor([0.0] + [1.0] * (C - 1)))
    value = loss(torch.randn(1, C, 2, 4, 4), torch.zeros(1, 1, 2, 4, 4, dtype=torch.long))
    assert value.item() == 0 and method.zero_weight_ce_terms() == 1


def test_defaults_are_the_original_scripts():
    method = make_method(SimiSCoTraining)
    assert (method.cfg.base_lr, method.cfg.cps_w, method.cfg.rampup_length) == (1e-3, 0.1, None)
    assert (method.init_a, method.init_b) == ("kaiming", "xavier")
    assert all(w.momentum == 0.99 and w.do_bg for w in method.weighting.values())
