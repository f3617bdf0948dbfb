"""CLD: class weights for known histograms (absent classes included), the confidence bank's schedule and EMA, the
sampling-rate formula, the per-class random voxel masks, the weighted cross loss (docs/methods.md#cld)."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import engine
from train_cld import CLD, ConfidenceBank, cal_sampling_rate, class_weights, sampling_mask
from utils.io import ConfigError
from test_methods_common import make_method, tiny_batch


def tiny_method(*extra):
    return make_method(CLD, extra)  # seeded, FAST flags on the phantom task (C = 14, patch 16x32x32)


def histogram_labels(counts):
    return np.concatenate([np.full(n, c, np.uint8) for c, n in enumerate(counts)])


def test_class_weights_cube_root_of_the_count_ratio():
    # idea 1: N = [1e6, 1e4, 1e3] -> (1e6 / N)^(1/3) = [1, 100^(1/3), 10] = [1, 4.6416, 10]
    labels = histogram_labels([1_000_000, 10_000, 1_000])
    w = class_weights([labels[:500_000], labels[500_000:]], 3)  # counts summed over volumes
    assert w.dtype == torch.float32 and torch.allclose(w, torch.tensor([1.0, 4.6415888, 10.0]), rtol=1e-6)


def test_absent_class_weight_rarest_by_default_inf_as_the_original():
    # N = [1000, 0, 8]: w_2 = (1000 / 8)^(1/3) = 5; class 1 is absent: original inf, here the rarest weight 5
    labels = [histogram_labels([1000, 0, 8])]
    assert torch.allclose(class_weights(labels, 3), torch.tensor([1.0, 5.0, 5.0]))
    original = class_weights(labels, 3, absent="inf")
    assert torch.isinf(original[1]) and torch.allclose(original[[0, 2]], torch.tensor([1.0, 5.0]))


def test_class_weights_from_a_tensor_or_a_dataset():
    y = torch.tensor([0, 0, 0, 0, 0, 0, 0, 0, 1]).view(1, 1, 1, 3, 3)  # N = [8, 1]: w = [1, 2]
    assert torch.allclose(class_weights(y, 2), torch.tensor([1.0, 2.0]))

    class Stored:
        def iter_stored_labels(self):
            yield from (np.zeros(27, np.int8), np.ones(1, np.int8))   # N = [27, 1]: w = [1, 3]
    assert torch.allclose(class_weights(Stored(), 2), torch.tensor([1.0, 3.0]))


def bank_batch(i, num_cls=3):
    g = torch.Generator().manual_seed(100 + i)
    out = torch.randn(2, num_cls, 2, 2, 2, generator=g)
    label = torch.randint(0, 2, (2, 1, 2, 2, 2), generator=g)  # class 2 never appears
    return out, label


def true_class_mean(batches, num_cls=3):
    sums, counts = np.zeros(num_cls), np.zeros(num_cls)
    for out, label in batches:
        p = torch.softmax(out, 1).double().numpy()
        y = label[:, 0].numpy()
        for c in range(num_cls):
            sums[c] += p[:, c][y == c].sum()
            counts[c] += (y == c).sum()
    return sums / (counts + 1e-12)


def test_confidence_bank_schedule_and_ema():
    # idea 2: no change for calls 1-7; call 8 takes the accumulated mean as is; call 16 is 0.999·old + 0.001·new;
    # a class never seen in the 8 calls has new = 0
    start = torch.tensor([0.2, 0.5, 0.7])
    bank = ConfidenceBank(3, confs=start, momentum=0.999, update_iter=8)
    batches = [bank_batch(i) for i in range(16)]
    for out, label in batches[:7]:
        bank.record_data(out, label)
        assert torch.equal(bank.get_confs(), start)
    bank.record_data(*batches[7])
    first = true_class_mean(batches[:8])
    assert first[2] == 0 and np.allclose(bank.get_confs().numpy(), first, rtol=1e-6)
    for out, label in batches[8:]:
        bank.record_data(out, label)
    second = 0.999 * first + 0.001 * true_class_mean(batches[8:])
    assert np.allclose(bank.get_confs().numpy(), second, rtol=1e-6)
    assert torch.equal(start, torch.tensor([0.2, 0.5, 0.7]))  # the caller's vector is not modified


def test_sampling_rate_formula():
    # idea 3: conf = [0.9, 0.5, 0.1] -> ((1 − conf) / 0.9)^0.5 = [1/3, sqrt(5/9), 1]
    r = cal_sampling_rate(torch.tensor([0.9, 0.5, 0.1]))
    assert torch.allclose(r, torch.tensor([1 / 3, (5 / 9) ** 0.5, 1.0]), atol=1e-6)
    assert torch.allclose(cal_sampling_rate(torch.tensor([0.9, 0.5, 0.1]), gamma=1.0),
                          torch.tensor([1 / 9, 5 / 9, 1.0]), atol=1e-6)


def test_sampling_mask_keeps_each_predicted_class_at_its_rate():
    # idea 4: rate 1 keeps everything, rate 0 drops every voxel predicted as that class, rate 0.25 keeps ~1/4
    torch.manual_seed(0)
    pred = torch.arange(3).repeat_interleave(20_000).view(2, 30_000)
    mask = sampling_mask(pred, torch.tensor([1.0, 0.0, 0.25]))
    assert mask.dtype == torch.float32 and mask.shape == pred.shape
    assert mask[pred == 0].min() == 1 and mask[pred == 1].max() == 0
    assert mask[pred == 2].mean().item() == pytest.approx(0.25, abs=0.01)


def test_cross_loss_is_a_weighted_voxel_mean_not_pytorchs_weighted_ce():
    # idea 5: with M ≡ 1 the cross term is mean_v w_ŷ·CE_v (≠ Σ w·CE / Σ w unless all w = 1)
    method = tiny_method()
    w = torch.tensor([1.0, 2.0, 4.0])
    method.cross_ce.update_weight(w)
    z = torch.randn(2, 3, 2, 3, 3, generator=torch.Generator().manual_seed(3))
    t = torch.randint(0, 3, (2, 2, 3, 3), generator=torch.Generator().manual_seed(4))
    ce = F.cross_entropy(z, t, reduction="none")
    loss = method.cross_ce(z, t, weight_map=torch.ones_like(ce))
    assert loss.item() == pytest.approx((w[t] * ce).mean().item(), rel=1e-6)
    assert loss.item() != pytest.approx(F.cross_entropy(z, t, weight=w).item(), rel=1e-3)


def test_banks_start_from_one_random_vector_and_weights_reach_every_loss():
    method = tiny_method()
    a, b = method.banks["A"].get_confs(), method.banks["B"].get_confs()
    assert torch.equal(a, b) and a is not b and ((a > 0) & (a < 1)).all()
    w = torch.linspace(1, 3, 14)
    method.set_weights(w)
    assert torch.equal(method.sup_losses["A"].ce.weight, w) and torch.equal(method.sup_losses["B"].dc.weight, w)
    assert torch.equal(method.cross_ce.weight, w)


def test_class_weights_reach_the_supervised_terms_its_loss_name_weights():
    """As the original builds ``make_loss_function(--sup_loss, weight)`` once: ce and ce+dice stay unweighted,
    wce+dice weights only its CE, w_ce+dice both terms (the previous code re-weighted every term of every name)."""
    from utils.loss import SoftDiceLoss, softmax_helper
    g = torch.Generator().manual_seed(5)
    z, y = torch.randn(2, 14, 2, 3, 3, generator=g), torch.randint(0, 14, (2, 1, 2, 3, 3), generator=g)
    w = torch.linspace(1, 3, 14)
    nll = F.cross_entropy(z, y[:, 0], reduction="none")
    ce, wce = nll.mean(), (w[y[:, 0]] * nll).sum() / w[y[:, 0]].sum()
    dice, wdice = SoftDiceLoss(apply_nonlin=softmax_helper)(z, y), SoftDiceLoss(w, apply_nonlin=softmax_helper)(z, y)
    expected = {"ce": ce, "wce": wce, "ce+dice": ce + dice, "wce+dice": wce + dice, "w_ce+dice": wce + wdice}
    assert wdice.item() != pytest.approx(dice.item(), rel=1e-3) and wce.item() != pytest.approx(ce.item(), rel=1e-3)
    for name, value in expected.items():
        method = tiny_method("--sup_loss", name)
        method.set_weights(w)
        for net in "AB":
            assert method.sup_losses[net](z, y).item() == pytest.approx(value.item(), rel=1e-6), (name, net)


def test_confs_iter_sets_the_banks_update_period():
    assert [b.update_iter for b in tiny_method().banks.values()] == [8, 8]  # the original's default
    method = tiny_method("--confs_iter", "3")
    bank = method.banks["B"]
    start = bank.get_confs().clone()
    assert method.banks["A"].update_iter == bank.update_iter == 3
    batches = [bank_batch(i, num_cls=14) for i in range(3)]
    for out, label in batches[:2]:
        bank.record_data(out, label)
        assert torch.equal(bank.get_confs(), start)
    bank.record_data(*batches[2])
    assert np.allclose(bank.get_confs().numpy(), true_class_mean(batches, num_cls=14), rtol=1e-6)
    with pytest.raises(ConfigError, match="--confs_iter 0"):
        tiny_method("--confs_iter", "0")


def test_training_step_matches_the_formula_and_lambda_zero_is_supervised():
    method = tiny_method()
    method.set_weights(torch.linspace(1, 2, 14))
    for net in method.nets.values():
        net.eval()  # no dropout: the step's logits can be recomputed
    x_l, y_l, x_u = tiny_batch()
    rng = torch.get_rng_state()
    out = method.training_step(x_l, y_l, x_u, engine.Step(0, 0, 0, 1e-3, 0.0))
    assert out["loss"].item() == pytest.approx(out["sup"].item(), rel=1e-7)
    assert method.banks["A"].calls == 1 and method.banks["A"].counts.sum() == y_l.numel()
    torch.set_rng_state(rng)
    with torch.no_grad():
        z_a, z_b, _ = method.forward_both(x_l, x_u)
    w = method.weights
    expected = 0
    for own, peer, net in ((z_a, z_b, "A"), (z_b, z_a, "B")):
        keep = sampling_mask(own.argmax(1), cal_sampling_rate(method.banks[net].get_confs()))  # own prediction
        t = peer.argmax(1)
        expected = expected + (keep * w[t] * F.cross_entropy(own, t, reduction="none")).mean()
    assert out["cps"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_cross_gradient_does_not_reach_the_teacher():
    # idea 6: targets and masks come from detached logits
    method = tiny_method()
    method.set_weights(torch.ones(14))
    x_l, y_l, x_u = tiny_batch()
    z_a, z_b, _ = method.forward_both(x_l, x_u)
    t_b = z_b.detach().argmax(1)
    keep = sampling_mask(z_a.detach().argmax(1), torch.ones(14))
    method.cross_ce(z_a, t_b, weight_map=keep).backward()
    assert all(p.grad is None for p in method.nets["B"].parameters())


def test_state_round_trip():
    method = tiny_method()
    method.set_weights(torch.linspace(1, 2, 14))
    x_l, y_l, x_u = tiny_batch()
    method.training_step(x_l, y_l, x_u, engine.Step(0, 0, 0, 1e-3, 1.0))
    other = tiny_method()
    other.load_state_dict(method.state_dict())
    assert torch.equal(other.weights, method.weights) and torch.equal(other.sup_losses["B"].ce.weight, method.weights)
    for k in "AB":
        assert other.banks[k].calls == 1 and torch.equal(other.banks[k].sums, method.banks[k].sums)


def test_only_wce_cross_loss_is_accepted():
    with pytest.raises(ConfigError, match="wce"):
        tiny_method("--cps_loss", "ce")
