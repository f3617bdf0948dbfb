"""ACISIS (code/train_acisis.py): Gompertz fuzzy rank, class confidence and sampling rates against an independent
float64 reference, the metric accumulation with and without the cross-sample broadcast, the sampling mask, the
unlabeled loss by hand, and the mean-teacher parts (EMA from the epoch, kaiming-initialised independent nets)."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import engine
from test_methods_common import make_method, tiny_batch
from train_acisis import ACISIS, P_FR, ConfidenceArray, fuzzy_rank, gompertz


def test_gompertz_values():
    g = gompertz(torch.tensor([0.0, 1.0], dtype=torch.float64))
    assert g[0].item() == pytest.approx(1 - math.exp(-1), abs=1e-12)            # 0.6321
    assert g[1].item() == pytest.approx(1 - math.exp(-math.exp(-2)), abs=1e-12)  # 0.1266
    assert g[1].item() == pytest.approx(0.12657, abs=1e-5)
    assert (gompertz(torch.linspace(0, 1, 50)).diff() < 0).all()


def test_fuzzy_rank_keeps_the_top_m_smallest():
    g = torch.tensor([[0.2, 0.5, 0.3, 0.4]], dtype=torch.float64)
    assert fuzzy_rank(g, 2).tolist() == [[0.2, P_FR, 0.3, P_FR]]
    assert torch.equal(fuzzy_rank(g, 9), g)  # top_m above C: everything kept (the original crashes)
    torch.manual_seed(0)
    g = gompertz(F.softmax(torch.randn(3, 14), 1)).double()
    kept = fuzzy_rank(g, 12)
    assert ((kept == P_FR).sum(1) == 2).all()  # C − top_m penalised per metric
    assert torch.equal(kept == P_FR, g >= g.sort(1).values[:, 12:13])  # ... the two largest G (smallest R)


def reference_rates(metrics, iters, cc, top_m, momentum=0.99, power=2.5):
    """The fusion written out in float64 loops: R = row softmax of the mean metrics, G = 1 − exp(−exp(−2R)),
    keep G of the top_m smallest per row else 0.632, FR = Σ G', CCF = 1 − Σ_{kept} R / 3, cur = CCF·FR / max,
    CC ← m·CC + (1 − m)·cur, rate = ((1 − CC)/max(1 − CC))^power."""
    m = np.asarray(metrics, np.float64) / iters
    r = np.exp(m) / np.exp(m).sum(1, keepdims=True)
    fr, ccf = np.zeros(m.shape[1]), np.ones(m.shape[1])
    for row in r:
        g = 1 - np.exp(-np.exp(-2 * row))
        kept = g <= np.sort(g)[top_m - 1]
        fr += np.where(kept, g, 0.632)
        ccf -= np.where(kept, row, 0.0) / 3
    cur = ccf * fr / (ccf * fr).max()
    cc = momentum * np.asarray(cc) + (1 - momentum) * cur
    return cc, ((1 - cc) / (1 - cc).max()) ** power


def test_rate_update_matches_the_reference_once_per_update_iter():
    arr = ConfidenceArray(5, momentum=0.99, update_iter=2, top_m=3)
    metrics = torch.tensor([[-1.5, -0.3, -2.0, -0.9, -4.0], [1.4, 0.2, 1.9, 0.8, 1.2], [0.1, 0.7, 0.05, 0.3, 0.4]])
    arr.entropy, arr.confidence, arr.variance = metrics.clone()
    arr.cur_iter = 1
    assert torch.equal(arr.cal_sampling_rate(), torch.ones(5))  # not the update iteration: rates stay at 1
    arr.cur_iter = 2
    cc_ref, rate_ref = reference_rates(metrics.numpy(), 2, np.zeros(5), 3)
    rate = arr.cal_sampling_rate()
    assert np.allclose(arr.cc.numpy(), cc_ref, atol=1e-7) and np.allclose(rate.numpy(), rate_ref, atol=1e-6)
    assert rate.max().item() == pytest.approx(1, abs=1e-6) and (rate >= 0).all() and (rate <= 1 + 1e-6).all()
    assert arr.cur_iter == 0 and arr.entropy.abs().sum() == 0 and arr.variance.abs().sum() == 0  # reset
    assert torch.equal(arr.cal_sampling_rate(), rate)  # unchanged until the next update_iter records
    frozen = ConfidenceArray(5, momentum=1.0, update_iter=1)  # CC stays 0 -> rate ≡ 1
    frozen.entropy, frozen.confidence, frozen.variance = metrics.clone()
    frozen.cur_iter = 1
    assert torch.equal(frozen.cal_sampling_rate(), torch.ones(5))


def two_voxel_batch():
    """Sample 0: logits (0, 0) -> p = (1/2, 1/2), label 0; sample 1: (ln 3, 0) -> p = (3/4, 1/4), label 1."""
    out = torch.tensor([[0.0, 0.0], [math.log(3), 0.0]]).view(2, 2, 1, 1, 1)
    gt = torch.tensor([0, 1]).view(2, 1, 1, 1, 1)
    return out, gt


L2, L3 = math.log(0.5), math.log(0.75) + math.log(0.25)  # Σ_k log p_k of sample 0 and sample 1
PER_SAMPLE = {"entropy": [0.5 * 2 * L2, 0.25 * L3], "confidence": [0.5, 0.25], "variance": [0.0, 0.5]}
# [B, 1, ...] labels broadcast: class c sums mask_i·metric_j over all pairs; each class has one voxel (N_c = 1)
BROADCAST = {"entropy": [0.5 * 2 * L2 + 0.75 * L3, 0.5 * 2 * L2 + 0.25 * L3], "confidence": [1.25, 0.75],
             "variance": [0.0, 0.5]}


@pytest.mark.parametrize("broadcast, squeeze, expected", [(True, False, BROADCAST), (False, False, PER_SAMPLE),
                                                          (True, True, PER_SAMPLE)])
def test_record_data_by_hand(broadcast, squeeze, expected):
    out, gt = two_voxel_batch()
    arr = ConfidenceArray(2, broadcast=broadcast)
    arr.record_data(out, gt[:, 0] if squeeze else gt)  # [B, ...] labels never broadcast (as the original)
    for key, values in expected.items():
        assert torch.allclose(getattr(arr, key), torch.tensor(values), atol=1e-6), key
    arr.record_data(out, gt[:, 0] if squeeze else gt)
    assert arr.cur_iter == 2
    assert torch.allclose(arr.confidence, 2 * torch.tensor(expected["confidence"]), atol=1e-6)  # accumulates


def test_broadcast_equals_the_originals_pairwise_product():
    torch.manual_seed(1)
    out, gt = torch.randn(2, 4, 2, 3, 3), torch.randint(0, 4, (2, 1, 2, 3, 3))
    arr = ConfidenceArray(4)
    arr.record_data(out, gt)
    p = F.softmax(out, 1)
    for c in range(4):
        n = (gt == c).sum() + 1e-12
        pair = p[:, c] * (gt == c)  # [B, D, H, W] × [B, 1, D, H, W] broadcasts to (B, B, D, H, W)
        assert pair.shape == (2, 2, 2, 3, 3)
        assert arr.confidence[c].item() == pytest.approx((pair.sum() / n).item(), rel=1e-5, abs=1e-7)
        var = (p.max(1).values - p[:, c]) * (gt == c)
        assert arr.variance[c].item() == pytest.approx((var.sum() / n).item(), rel=1e-5, abs=1e-7)
        ent = p[:, c].unsqueeze(1) * torch.log(p + 1e-12) * (gt == c).unsqueeze(1)  # (B, B, C, D, H, W)
        assert arr.entropy[c].item() == pytest.approx((ent.sum() / n).item(), rel=1e-5, abs=1e-7)


def test_sampling_mask_keeps_class_c_with_rate_c():
    torch.manual_seed(2)
    out = torch.randn(2, 3, 8, 64, 64)
    q, pred = F.softmax(out, 1).max(1).values, out.argmax(1)
    arr = ConfidenceArray(3)
    arr.rate = torch.tensor([1.0, 0.0, 0.0])
    mask = arr.cal_sampling_mask(out)
    assert torch.equal(mask != 0, pred == 0)                            # only class-0 voxels survive ...
    assert torch.allclose(mask[pred == 0], q[pred == 0] ** 1.5)         # ... weighted by q^1.5
    arr.rate = torch.tensor([0.0, 0.5, 0.0])
    kept = (arr.cal_sampling_mask(out) != 0).float()
    assert kept[pred == 1].mean().item() == pytest.approx(0.5, abs=0.01)  # ~22k class-1 voxels
    assert kept[pred != 1].sum() == 0


def test_mean_teacher_parts_kaiming_independent_ema_from_epoch():
    method = make_method(ACISIS)
    s, t = method.student.block_five.conv[0].weight, method.teacher.block_five.conv[0].weight
    assert s.std().item() == pytest.approx((2 / (64 * 27)) ** 0.5, rel=0.05)  # kaiming fan_in, F = 4
    assert t.std().item() == pytest.approx((2 / (64 * 27)) ** 0.5, rel=0.05) and not torch.equal(s, t)
    trained = {id(p) for opt in engine.make_optimizers(method, 0.01).values() for p in opt.param_groups[0]["params"]}
    assert trained == {id(p) for p in method.student.parameters()}
    old = [p.clone() for p in method.teacher.parameters()]
    method.after_optimizer_step(engine.Step(1, 0, 40, 0.01, 0.1))  # epoch 1: α = 0.5, the average
    assert all(torch.allclose(p, (o + q) / 2) for p, o, q in zip(method.teacher.parameters(), old,
                                                                 method.student.parameters()))
    method.after_optimizer_step(engine.Step(0, 3, 3, 0.01, 0.1))    # epoch 0: α = 0, a copy
    assert all(torch.equal(p, q) for p, q in zip(method.teacher.parameters(), method.student.parameters()))


def test_loss_flag_defaults_are_the_originals_names_and_unweighted():
    method = make_method(ACISIS)
    assert (method.cfg.sup_loss, method.cfg.cps_loss) == ("wce+dice", "ce")  # the original script's argparse
    assert method.sup_loss.ce.weight is None and method.sup_loss.dc.weight is None  # no weight is ever passed


def test_training_step_by_hand_with_the_update_in_the_last_iteration():
    method = make_method(ACISIS)
    method.on_train_start(range(7))  # a labeled set of 7 (repeated) items
    assert method.confs.update_iter == 4  # ceil(7 / batch 2)
    method.confs.update_iter = 1          # this step is the epoch's last: it records, updates, then samples
    method.student.eval(), method.teacher.eval()
    x_l, y_l, x_u = tiny_batch()
    torch.manual_seed(5)
    out = method.training_step(x_l, y_l, x_u, engine.Step(0, 0, 0, 0.01, 0.3))
    with torch.no_grad():
        z = method.student(torch.cat([x_l, x_u]))
        pseudo = method.teacher(x_u).argmax(1)
    twin = ConfidenceArray(14, update_iter=1)
    twin.record_data(z[:2], y_l)
    rate = twin.cal_sampling_rate()
    assert torch.allclose(method.confs.rate, rate) and not torch.equal(rate, torch.ones(14))
    assert method.confs.cur_iter == 0
    torch.manual_seed(5)  # eval mode: the mask's uniform draw is the step's only random number
    u = torch.rand(2, 16, 32, 32)
    q, pred = F.softmax(z[2:], 1).max(1).values, z[2:].argmax(1)
    weight = (u > 1 - rate[pred]).float() * q ** 1.5
    loss_u = (weight * F.cross_entropy(z[2:], pseudo, reduction="none")).mean()  # mean over all voxels
    assert out["cps"].item() == pytest.approx(loss_u.item(), rel=1e-5)
    sup = F.cross_entropy(z[:2], y_l[:, 0])
    probs, onehot = F.softmax(z[:2], 1), F.one_hot(y_l[:, 0], 14).permute(0, 4, 1, 2, 3)
    tp, size = (probs * onehot).sum((0, 2, 3, 4))[1:], (probs + onehot).sum((0, 2, 3, 4))[1:]
    sup = sup - ((2 * tp + 1) / (size + 1 + 1e-8)).mean()  # CE − soft Dice (smooth 1, foreground)
    assert out["sup"].item() == pytest.approx(sup.item(), rel=1e-5)
    assert out["loss"].item() == pytest.approx(sup.item() + 0.3 * loss_u.item(), rel=1e-5)
    logged = method.on_epoch_end(0)
    assert torch.equal(logged["acisis/sampling_rate"], rate) and logged["acisis/class_confidence"].shape == (14,)


def test_state_round_trip_and_per_sample_option():
    method = make_method(ACISIS, ["--acisis_record", "per_sample"])
    assert method.confs.broadcast is False and make_method(ACISIS).confs.broadcast is True
    out, gt = torch.randn(2, 14, 2, 4, 4), torch.randint(0, 14, (2, 1, 2, 4, 4))
    method.confs.record_data(out, gt)
    with torch.no_grad():
        method.teacher.out_conv.bias.add_(1.0)
    state = method.state_dict()
    other = make_method(ACISIS, ["--acisis_record", "per_sample"])
    other.load_state_dict(state)
    for key, value in state["confidence_array"].items():
        got = getattr(other.confs, key)
        assert torch.equal(got, value) if torch.is_tensor(value) else got == value, key
    assert all(torch.equal(a, b) for a, b in zip(other.teacher.state_dict().values(),
                                                 method.teacher.state_dict().values()))


def test_rates_update_once_per_engine_epoch(tiny_data):
    """Through the engine: update_iter equals the iterations per epoch, so every epoch ends with a rate update."""
    from conftest import FAST
    engine.run(ACISIS, FAST + ["--exp", "acisis_rates", "-ep", "1", "--eval_every", "5"])
    state = torch.load(tiny_data / "logs" / "acisis_rates" / "ckpts" / "last.pth", weights_only=False)["method"]
    confs = state["confidence_array"]
    assert confs["update_iter"] == 2 and confs["cur_iter"] == 0  # 4 unlabeled cases / batch 2; reset at the end
    assert (confs["cc"] > 0).all() and confs["rate"].max().item() == pytest.approx(1, abs=1e-6)
    assert (confs["rate"] < 1).any()  # two updates (epochs 0 and 1) moved the rates off their initial ones
