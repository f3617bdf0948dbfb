"""Adsh: the bank schedule, threshold estimation against hand computation and a reference, the strict sampling
maps, the logits-gating cross loss and its option, the bank size K, resumable state (docs/methods.md#adsh)."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import engine
from train_adsh import ADSH, ADSHCoTraining, cal_sampling_mask, estimate_thresholds
from utils.io import ConfigError
from test_methods_common import make_method, tiny_batch

C, PATCH = 4, (4, 4, 4)


def tiny_method(*extra):
    return make_method(ADSHCoTraining, extra)  # seeded, FAST flags on the phantom task (C = 14)


def logits(seed, batch=2):
    return 3 * torch.randn(batch, C, *PATCH, generator=torch.Generator().manual_seed(seed))


def test_hand_computed_thresholds():
    # one slot, C = 3, four voxels (columns):   v0    v1    v2   v3
    bank = torch.tensor([[0.95, 0.92, 0.60, 0.2],   # class 0
                         [0.03, 0.05, 0.30, 0.7],   # class 1
                         [0.02, 0.03, 0.10, 0.1]]).view(1, 3, 1, 1, 4)
    # n = [3, 1, 0] (argmax per voxel), majority k = 0, ρ = (#(P_0 > 0.9) + 1e-8)/(n_0 + 1e-8) = 2/3
    # ranks ⌊ρ·n⌋ = [2, 0, 0]: thr_0 = sorted_desc(P_0)[2] = 0.6, thr_1 = max P_1 = 0.7, thr_2 (never
    # predicted) = max P_2 = 0.1
    thr = estimate_thresholds(bank, 0.9)
    assert torch.allclose(thr, torch.tensor([0.6, 0.7, 0.1]))


def reference_thresholds(bank, tau=0.9):
    p = bank.numpy().astype(np.float32)
    k_, c_ = p.shape[:2]
    flat = p.transpose(1, 0, 2, 3, 4).reshape(c_, -1)
    n = np.bincount(p.argmax(1).ravel(), minlength=c_)
    k = int(n.argmax())
    rho = np.float32((np.sum(flat[k] > tau) + 1e-8)) / np.float32(n[k] + 1e-8)
    return np.array([np.sort(flat[c])[::-1][int(rho * np.float32(n[c]))] for c in range(c_)])


def test_estimation_matches_a_reference_on_a_random_bank():
    g = torch.Generator().manual_seed(0)
    z = 4 * torch.randn(3, C, *PATCH, generator=g)
    z[:, 0] += 3  # a clear majority class with many voxels above 0.9
    bank = torch.softmax(z, 1)
    thr = estimate_thresholds(bank, 0.9)
    assert np.allclose(thr.numpy(), reference_thresholds(bank), atol=0)
    assert (bank[:, 0] > 0.9).any()
    # the majority threshold sits at 0.9 within one rank: the smallest value > 0.9 or the largest <= 0.9
    values = bank[:, 0].flatten()
    assert thr[0] in (values[values > 0.9].min(), values[values <= 0.9].max())


def test_bank_schedule_k4_two_stores_then_an_estimate():
    # idea 1: K = 4, bsz 2: calls 1–2 store and return zeros; call 3 estimates from the bank (not storing its
    # batch), resets the pointer; calls 4–5 store again and return the same values
    adsh = ADSH(C, thresh_major=0.9, tot_iter=4, patch_size=PATCH)
    out1, out2 = adsh.get_thresholds(logits(1)).clone(), adsh.get_thresholds(logits(2)).clone()
    assert torch.equal(out1, torch.zeros(C)) and torch.equal(out2, torch.zeros(C)) and adsh.cur_iter == 4
    bank = torch.cat([torch.softmax(logits(1), 1), torch.softmax(logits(2), 1)])
    assert torch.equal(adsh.scores, bank)
    thr = adsh.get_thresholds(logits(3))
    assert adsh.cur_iter == 0 and torch.equal(thr, estimate_thresholds(bank, 0.9)) and thr.abs().sum() > 0
    frozen = thr.clone()
    assert torch.equal(adsh.get_thresholds(logits(4)), frozen) and torch.equal(adsh.get_thresholds(logits(5)), frozen)
    assert adsh.get_thresholds(logits(6)) is thr  # the same tensor, updated in place


def test_odd_bank_never_writes_its_last_slot():
    adsh = ADSH(C, thresh_major=0.9, tot_iter=5, patch_size=PATCH)
    for i in range(12):  # four cycles: store, store, estimate
        adsh.get_thresholds(logits(i))
    assert torch.equal(adsh.scores[4], torch.zeros(C, *PATCH)) and adsh.scores[:4].abs().sum() > 0


def test_sampling_mask_is_strict_float_and_shaped_like_the_logits():
    z = logits(7)
    probs = torch.softmax(z, 1)
    thresholds = probs[0, :, 0, 0, 0].clone()  # voxel (0, 0, 0, 0) sits exactly at every class's threshold
    s = cal_sampling_mask(z, thresholds)
    assert s.shape == z.shape and s.dtype == torch.float32
    assert s[0, :, 0, 0, 0].sum() == 0                                 # equal is excluded (>)
    assert torch.equal(s, (probs > thresholds.view(1, C, 1, 1, 1)).float())
    assert torch.equal(cal_sampling_mask(z, torch.zeros(C)), torch.ones_like(z))  # thr 0: everything passes


def test_cross_loss_gates_the_logits():
    # idea 3: CE(z ⊙ S, t) over all voxels; zero gradient where S == 0; an all-zero S costs log C
    method = tiny_method()
    z = logits(8).requires_grad_()
    t = logits(9).argmax(1)
    s = (torch.rand(z.shape, generator=torch.Generator().manual_seed(1)) > 0.5).float()
    loss = method.cross_loss(z, t, s, "A")
    assert loss.item() == pytest.approx(F.cross_entropy(z * s, t).item(), rel=1e-6)
    loss.backward()
    assert torch.all(z.grad[s == 0] == 0) and z.grad[s == 1].abs().sum() > 0
    assert method.cross_loss(z, t, torch.zeros_like(z), "A").item() == pytest.approx(math.log(C), rel=1e-6)
    # idea 4: with S ≡ 1 (all thresholds 0) it is the plain CPS cross-entropy
    assert method.cross_loss(z, t, torch.ones_like(z), "A").item() == pytest.approx(F.cross_entropy(z, t).item())


def test_voxel_mask_option_masks_the_loss():
    method = tiny_method("--adsh_mask", "voxel")
    z, t = logits(10), logits(11).argmax(1)
    s = (torch.rand(z.shape, generator=torch.Generator().manual_seed(2)) > 0.5).float()
    keep = s.gather(1, t.unsqueeze(1)).squeeze(1)  # does the peer's class pass its threshold?
    expected = (F.cross_entropy(z, t, reduction="none") * keep).mean()
    assert method.cross_loss(z, t, s, "A").item() == pytest.approx(expected.item(), rel=1e-6)


class FakeLabeled:
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n


@pytest.mark.parametrize("unlabeled, bank", [(17, 4), (206, 51), (16, 4), (3, 1)])
def test_bank_size_is_a_quarter_of_the_unlabeled_cases(unlabeled, bank):
    method = tiny_method()
    method.on_train_start(FakeLabeled(unlabeled))  # the labeled set repeats to the unlabeled length
    assert {k: a.tot_iter for k, a in method.adsh.items()} == {"A": bank, "B": bank}
    assert method.adsh["A"].scores.shape == (bank, 14, 16, 32, 32)
    method = tiny_method("--adsh_bank", "6")
    method.on_train_start(FakeLabeled(unlabeled))
    assert method.adsh["B"].tot_iter == 6


def test_training_step_first_cycle_is_plain_cps_and_lambda_zero_is_supervised():
    method = tiny_method("--adsh_bank", "4")
    method.on_train_start(FakeLabeled(16))
    for net in method.nets.values():
        net.eval()  # no dropout: the step's logits can be recomputed
    x_l, y_l, x_u = tiny_batch()
    out = method.training_step(x_l, y_l, x_u, engine.Step(0, 0, 0, 1e-3, 0.0))
    assert out["loss"].item() == pytest.approx(out["sup"].item(), rel=1e-7)
    with torch.no_grad():
        z_a, z_b, _ = method.forward_both(x_l, x_u)
    plain = F.cross_entropy(z_a, z_b.argmax(1)) + F.cross_entropy(z_b, z_a.argmax(1))
    assert out["cps"].item() == pytest.approx(plain.item(), rel=1e-5)  # thresholds still 0
    assert torch.equal(method.adsh["A"].scores[:2], torch.softmax(z_a[2:], 1))  # the unlabeled half is banked


def test_state_round_trip_continues_identically():
    adsh = ADSH(C, thresh_major=0.9, tot_iter=4, patch_size=PATCH)
    for i in range(4):  # store, store, estimate, store
        adsh.get_thresholds(logits(i))
    state = adsh.state_dict()
    assert state["cur_iter"] == 2 and state["filled"].shape == (2, C, *PATCH)
    other = ADSH(C, thresh_major=0.9, tot_iter=1, patch_size=PATCH)
    other.load_state_dict(state)
    assert other.tot_iter == 4 and torch.equal(other.thresholds, adsh.thresholds)
    for i in range(4, 10):
        assert torch.equal(other.get_thresholds(logits(i)), adsh.get_thresholds(logits(i)))


def test_only_wce_cross_loss_is_accepted():
    with pytest.raises(ConfigError, match="wce"):
        tiny_method("--cps_loss", "ce")
