"""cls (docs/methods.md#cls): CLS weights = DHC's DistDW, ×C, against hand computation; EMA from each net's own
unlabeled-half argmax; the weights in both losses of their net; defaults and ramp-up of the original script."""
import math

import numpy as np
import pytest
import torch

from cotraining_helpers import C, check_weighted_step, make_method
from train_cls import CLS, CLSCoTraining
from train_dhc import DistDW
from utils.ramps import unsup_weight_at_epoch


def distdw_reference(counts):
    """f(N) = K·log((max N + ε)/(N_c + ε)) / max_k log((max N + ε)/(N_k + ε)), K = len(N)."""
    counts = np.asarray(counts, dtype=np.float64)
    log_ratio = np.log((counts.max() + 1e-8) / (counts + 1e-8))
    return len(counts) * log_ratio / log_ratio.max()


def labels_with_counts(counts):
    return np.repeat(np.arange(len(counts)), counts)


def test_weights_of_a_known_histogram():
    # N = [900, 50, 30, 20], K = 4: 4·[0, ln 18, ln 30, ln 45] / ln 45 = [0, 3.0372, 3.5739, 4.0]
    w = CLS(4).init_weights([labels_with_counts([900, 50, 30, 20])])
    assert np.allclose(w.numpy(), [0.0, 3.0372, 3.5739, 4.0], atol=1e-4)


def test_absent_class_gets_k_and_signature_is_the_originals():
    # N = [100, 10, 0]: the absent class has the largest log-ratio -> weight K = 3; the majority class 0
    cls = CLS(3)
    w = cls.init_weights([labels_with_counts([100, 10, 0])])
    assert w[0] == 0 and w[2].item() == pytest.approx(3.0)
    assert w[1].item() == pytest.approx(3 * math.log(10) / math.log((100 + 1e-8) / 1e-8), rel=1e-5)
    assert cls.momentum == 0.95 and cls.do_bg is False  # CLS(num_cls, do_bg=False, momentum=0.95)


def test_equals_distdw_on_random_histograms():
    rng = np.random.default_rng(0)
    for _ in range(5):
        counts = rng.integers(1, 5000, C)
        labels = [labels_with_counts(counts)]
        cls, dist = CLS(C, momentum=0.99), DistDW(C, momentum=0.99)
        assert torch.equal(cls.init_weights(labels), dist.init_weights(labels))
        assert np.allclose(cls.weights.numpy(), distdw_reference(counts), rtol=1e-5)
        logits = torch.randn(2, C, 2, 4, 4)
        assert torch.equal(cls.get_ema_weights(logits), dist.get_ema_weights(logits))


def test_init_from_a_labeled_dataset_and_ema_on_the_logits_device():
    class Stored:  # what the engine passes: the labeled dataset, read through iter_stored_labels()
        def iter_stored_labels(self):
            yield labels_with_counts([900, 50, 30, 20])[:500]
            yield labels_with_counts([900, 50, 30, 20])[500:]
    cls = CLS(4, momentum=0.99)
    w0 = cls.init_weights(Stored()).clone()
    logits = torch.nn.functional.one_hot(torch.tensor([0, 0, 0, 0, 1, 1, 2, 3]), 4).T.float().reshape(1, 4, 2, 2, 2)
    w1 = cls.get_ema_weights(logits)  # histogram [4, 2, 1, 1] -> f = 4·[0, ln 2, ln 4, ln 4] / ln 4 = [0, 2, 4, 4]
    assert w1.device == logits.device and w1.shape == (4,)
    assert np.allclose(w1.numpy(), 0.99 * w0.numpy() + 0.01 * np.array([0, 2, 4, 4]), atol=1e-6)


@pytest.mark.parametrize("lam", [0.0, 0.3])
def test_step_weights_from_own_unlabeled_half_enter_both_losses(lam):
    # λ = 0: the loss is the (weighted) supervised loss only
    check_weighted_step(CLSCoTraining, distdw_reference, labeled_init=distdw_reference, count_labeled=False,
                        lam=lam)


def test_defaults_ramp_and_init_are_the_original_scripts():
    method = make_method(CLSCoTraining, "-ep", "300")
    cfg = method.cfg
    assert (cfg.base_lr, cfg.cps_w, cfg.rampup_length) == (1e-3, 0.1, 300)  # -r on by default in train_cls.py
    assert unsup_weight_at_epoch(0, cfg.cps_w, cfg.rampup_length) == pytest.approx(0.1 * math.exp(-5))
    assert unsup_weight_at_epoch(301, cfg.cps_w, cfg.rampup_length) == pytest.approx(0.1)
    assert (method.init_a, method.init_b) == ("kaiming", "xavier")
    assert set(method.best_checkpoint()) == {"A", "B"}
    assert all(w.momentum == 0.99 for w in method.weighting.values())
