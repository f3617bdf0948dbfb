"""crest (docs/methods.md#crest): the reversed-μ class weights against the spec's worked examples and an
independent reference (stable ties), the EMA from each net's own unlabeled-half argmax, both losses weighted."""
import numpy as np
import torch

from cotraining_helpers import C, check_weighted_step, make_method
from train_crest import CReST, CReSTCoTraining
from utils.ramps import unsup_weight_at_epoch


def crest_reference(counts):
    """μ_c = ((N_c + ε)/(max N + ε))^(1/3); classes sorted by μ descending, ties by index (Python's sort is stable);
    the l-th class of that order takes the μ of the (K−1−l)-th."""
    counts = np.asarray(counts, dtype=np.float64)
    mu = ((counts + 1e-8) / (counts.max() + 1e-8)) ** (1 / 3)
    order = sorted(range(len(mu)), key=lambda c: -mu[c])
    weights = np.empty_like(mu)
    for rank, c in enumerate(order):
        weights[c] = mu[order[len(mu) - 1 - rank]]
    return weights


def weights_of(counts):
    return CReST(len(counts)).init_weights([np.repeat(np.arange(len(counts)), counts)]).numpy()


def test_worked_example_with_an_absent_class():
    # μ = [1, 0.2, 0.5, (1e-8/1000)^(1/3) = 2.154e-4, 0.3]; order 0, 2, 4, 1, 3 -> w = [2.154e-4, 0.5, 0.2, 1, 0.3]
    w = weights_of([1000, 8, 125, 0, 27])
    assert np.allclose(w, [2.1544e-4, 0.5, 0.2, 1.0, 0.3], rtol=1e-4)
    mu = ((np.array([1000, 8, 125, 0, 27]) + 1e-8) / (1000 + 1e-8)) ** (1 / 3)
    assert np.allclose(np.sort(w), np.sort(mu), rtol=1e-6) and w.argmax() == 3  # a permutation; rarest gets 1


def test_equal_counts_give_ones_and_geometric_counts_reverse_mu():
    assert np.allclose(weights_of([7, 7, 7, 7]), 1.0)
    # each count 8x the next: μ = [1, 1/2, 1/4, 1/8] -> reversed
    assert np.allclose(weights_of([512, 64, 8, 1]), [0.125, 0.25, 0.5, 1.0], rtol=1e-6)


def test_ties_are_broken_by_class_index():
    # μ = [1, 0.4642, 0.4642, 4.6e-4, 4.6e-4]: equal counts get different weights (faithful)
    w = weights_of([100, 10, 10, 0, 0])
    assert np.allclose(w, [4.6416e-4, 4.6416e-4, 0.46416, 0.46416, 1.0], rtol=1e-4)


def test_matches_the_reference_on_random_histograms_with_ties_and_zeros():
    rng = np.random.default_rng(1)
    crest = CReST(C)
    for _ in range(10):
        counts = rng.choice([0, 0, 5, 5, 40, 300, 2000], size=C)
        counts[0] = 5000
        got = crest._cal_weights(torch.as_tensor(counts))
        assert np.allclose(got.numpy(), crest_reference(counts), rtol=1e-5), counts


def test_ema_step_on_the_logits_device_and_signature():
    crest = CReST(4)
    assert (crest.do_bg, crest.momentum) == (False, 0.99)  # CReST(num_cls, do_bg=False, momentum=0.99)
    w0 = crest.init_weights([np.repeat(np.arange(4), [512, 64, 8, 1])]).clone()   # [1/8, 1/4, 1/2, 1]
    logits = torch.nn.functional.one_hot(torch.tensor([0] * 8 + [1] * 8), 4).T.float().reshape(1, 4, 2, 2, 4)
    w1 = crest.get_ema_weights(logits)  # histogram [8, 8, 0, 0]: μ = [1, 1, ε', ε'] -> w = [ε', ε', 1, 1]
    tiny = (1e-8 / 8) ** (1 / 3)
    assert w1.device == logits.device
    assert np.allclose(w1.numpy(), 0.99 * w0.numpy() + 0.01 * np.array([tiny, tiny, 1, 1]), rtol=1e-6)


def test_step_weights_from_own_unlabeled_half_enter_both_losses():
    method = check_weighted_step(CReSTCoTraining, crest_reference, labeled_init=crest_reference,
                                 count_labeled=False)
    # A and B evolve independently: their pseudo-label histograms differ, so do their weights
    assert not torch.equal(method.weighting["A"].weights, method.weighting["B"].weights)


def test_defaults_are_the_original_scripts():
    method = make_method(CReSTCoTraining)
    cfg = method.cfg
    assert (cfg.base_lr, cfg.cps_w, cfg.rampup_length) == (1e-3, 0.1, None)  # -r off by default
    assert unsup_weight_at_epoch(0, cfg.cps_w, cfg.rampup_length) == unsup_weight_at_epoch(50, 0.1) == 0.1
    assert (method.init_a, method.init_b) == ("kaiming", "xavier")
    assert all(w.momentum == 0.99 and w.do_bg for w in method.weighting.values())
