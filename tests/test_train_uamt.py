"""UA-MT (code/train_uamt.py) and the shared mean-teacher base (code/meanteacher.py): hand-computed values of the
EMA, the threshold schedule, the MC-entropy and the masked consistency; the teacher is never trained."""
import math

import pytest
import torch
import torch.nn.functional as F

import engine
import train_uamt
from meanteacher import ema_alpha
from test_methods_common import make_method, tiny_batch
from train_uamt import (UAMT, predictive_uncertainty, softmax_mse_loss, uamt_consistency_loss,
                        uncertainty_threshold, update_ema_variables)

LN2 = math.log(2)


def small_net(seed):
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Conv3d(1, 2, 3), torch.nn.BatchNorm3d(2))
    net[1].running_mean.uniform_()  # distinguishable buffers
    return net


@pytest.mark.parametrize("step, alpha", [(0, 0.0), (1, 0.5), (2, 2 / 3), (9, 0.9), (99, 0.99), (150, 0.99)])
def test_ema_alpha_from_the_step_and_parameters_only(step, alpha):
    student, teacher = small_net(0), small_net(1)
    old = [p.clone() for p in teacher.parameters()]
    buffers = {k: v.clone() for k, v in teacher.state_dict().items() if "running" in k or "num_batches" in k}
    assert ema_alpha(step) == pytest.approx(alpha, abs=1e-12)  # α = min(1 − 1/(g+1), 0.99)
    assert update_ema_variables(student, teacher, 0.99, step) == pytest.approx(alpha, abs=1e-12)
    for new, was, s in zip(teacher.parameters(), old, student.parameters()):
        assert torch.allclose(new, alpha * was + (1 - alpha) * s, atol=1e-7)  # θ_T ← α·θ_T + (1 − α)·θ_S
        if step == 0:
            assert torch.equal(new, s)  # α = 0: an exact parameter copy
    for key, value in buffers.items():  # BatchNorm statistics are not averaged
        assert torch.equal(teacher.state_dict()[key], value), key


def test_method_ema_uses_the_epoch_by_default_and_the_iteration_on_request():
    method = make_method(UAMT)
    student, teacher = method.student, method.teacher
    assert not torch.equal(student.out_conv.weight, teacher.out_conv.weight)  # independent init
    method.after_optimizer_step(engine.Step(epoch=0, it=5, global_it=5, lr=0.01, unsup_w=0.1))
    assert all(torch.equal(t, s) for t, s in zip(teacher.parameters(), student.parameters()))  # α = 0 at epoch 0
    with torch.no_grad():
        before = [p.clone() for p in teacher.parameters()]
        for p in student.parameters():
            p.add_(1.0)
    method.after_optimizer_step(engine.Step(epoch=1, it=0, global_it=9, lr=0.01, unsup_w=0.1))
    assert all(torch.allclose(t, b + 0.5) for t, b in zip(teacher.parameters(), before))  # α(epoch 1) = 0.5
    per_iteration = make_method(UAMT, ["--ema_step", "iteration"])
    with torch.no_grad():
        old = [p.clone() for p in per_iteration.teacher.parameters()]
    per_iteration.after_optimizer_step(engine.Step(epoch=0, it=3, global_it=3, lr=0.01, unsup_w=0.1))
    for t, o, s in zip(per_iteration.teacher.parameters(), old, per_iteration.student.parameters()):
        assert torch.allclose(t, 0.75 * o + 0.25 * s, atol=1e-7)  # α(g = 3) = 1 − 1/4


def test_softmax_mse_is_elementwise():
    a = torch.tensor([0.0, 0.0]).view(1, 2, 1, 1, 1)          # p = (1/2, 1/2)
    b = torch.tensor([math.log(3), 0.0]).view(1, 2, 1, 1, 1)  # p = (3/4, 1/4)
    d = softmax_mse_loss(a, b)
    assert d.shape == a.shape and torch.allclose(d.flatten(), torch.tensor([1 / 16, 1 / 16]))


def test_threshold_schedule():
    # τ = (0.75 + 0.25·exp(−5(1 − e/E)²))·ln 2
    assert uncertainty_threshold(0, 300) == pytest.approx((0.75 + 0.25 * math.exp(-5)) * LN2, rel=1e-12)
    assert uncertainty_threshold(0, 300) == pytest.approx(0.52102, abs=1e-5)
    assert uncertainty_threshold(150, 300) == pytest.approx((0.75 + 0.25 * math.exp(-1.25)) * LN2, rel=1e-12)
    assert uncertainty_threshold(300, 300) == pytest.approx(LN2, rel=1e-12)
    assert uncertainty_threshold(400, 300) == pytest.approx(LN2, rel=1e-12)  # clipped at E
    assert uncertainty_threshold(300, 300, num_classes=14) == pytest.approx(math.log(14), rel=1e-12)


def test_predictive_uncertainty_of_known_probabilities():
    # sample 0: passes alternate p = (0.9, 0.1) and (0.1, 0.9) -> p̄ = (0.5, 0.5), U = −ln(0.5 + 1e-6) ≈ ln 2
    # sample 1: every pass gives logits (0, 0, 0) over 3 classes -> uniform, U = −ln(1/3 + 1e-6) ≈ ln 3
    t = 4
    logits = torch.zeros(t, 2, 3, 1, 2, 2)
    logits[:, 0, 2] = -1e4  # class 2 absent for sample 0
    logits[0::2, 0, 0], logits[1::2, 0, 1] = math.log(9), math.log(9)
    u = predictive_uncertainty(logits)
    assert u.shape == (2, 1, 1, 2, 2)
    assert torch.allclose(u[0], torch.full_like(u[0], -math.log(0.5 + 1e-6)), atol=1e-6)
    assert torch.allclose(u[1], torch.full_like(u[1], -math.log(1 / 3 + 1e-6)), atol=1e-6)
    assert (u[1] > uncertainty_threshold(10 ** 6, 1)).all()  # uniform over C ≥ 3 is always masked out (ln 3 > ln 2)


class SampleIndexTeacher(torch.nn.Module):
    """Stands in for the teacher: sample k (input ≈ 10·k, noise ≤ 0.2) always gets the logit map ``maps[k]``."""

    def __init__(self, maps):
        super().__init__()
        self.maps, self.seen = maps, []

    def forward(self, x):
        k = torch.round(x.mean((1, 2, 3, 4)) / 10).long()
        self.seen.append(k.tolist())
        return self.maps[k]


def test_mc_passes_are_paired_with_their_sample():
    method = make_method(UAMT)
    maps = torch.tensor([[2.0, 0.0, -1.0], [-3.0, 1.0, 0.5]]).view(2, 3, 1, 1, 1).expand(2, 3, 2, 4, 4)
    method.aux["teacher"] = SampleIndexTeacher(maps)
    x_u = torch.stack([torch.zeros(1, 2, 4, 4), torch.full((1, 2, 4, 4), 10.0)])
    u = method.mc_uncertainty(x_u)
    assert method.aux["teacher"].seen == [[0, 1, 0, 1]] * 4  # T/2 = 4 passes over (u0, u1, u0, u1)
    for k in range(2):
        p = F.softmax(maps[k, :, 0, 0, 0], 0)  # p̄ of sample k = softmax of its own map
        assert torch.allclose(u[k], -(p * torch.log(p + 1e-6)).sum().expand_as(u[k]), atol=1e-6)


def test_consistency_normalised_by_twice_the_certain_voxels():
    torch.manual_seed(0)
    s, t = torch.randn(2, 3, 1, 2, 2), torch.randn(2, 3, 1, 2, 2)
    uncertainty = torch.tensor([0.1, 0.9, 0.2, 0.8, 0.7, 0.3, 0.6, 0.65]).view(2, 1, 1, 2, 2)
    d = (F.softmax(s, 1) - F.softmax(t, 1)) ** 2
    mask = uncertainty < 0.5  # 3 certain voxels
    expected = d.permute(0, 2, 3, 4, 1)[mask[:, 0]].sum() / (2 * 3 + 1e-16)  # Σ M·D / (2·ΣM): ΣM counts voxels
    assert uamt_consistency_loss(s, t, uncertainty, 0.5).item() == pytest.approx(expected.item(), rel=1e-6)
    expected_c = d.permute(0, 2, 3, 4, 1)[mask[:, 0]].sum() / (3 * 3)
    assert uamt_consistency_loss(s, t, uncertainty, 0.5, num_classes=3).item() == pytest.approx(expected_c.item(),
                                                                                                 rel=1e-6)
    assert uamt_consistency_loss(s, t, uncertainty, 0.0).item() == 0.0  # nothing certain: 0, not NaN


def small_batch():
    """tiny_batch cropped to 16³ (the teacher runs five times per step): x_l, y_l [2, 1, 16, 16, 16], x_u."""
    return tuple(t[..., :16, :16] for t in tiny_batch())


def eval_step(method, epoch=0, unsup_w=0.1):
    method.student.eval()  # deterministic student (no dropout, running BN statistics)
    x_l, y_l, x_u = small_batch()
    out = method.training_step(x_l, y_l, x_u, engine.Step(epoch, 0, 0, 0.01, unsup_w))
    return out, (x_l, y_l, x_u)


def test_nothing_certain_leaves_half_ce_plus_dice(monkeypatch):
    method = make_method(UAMT)
    monkeypatch.setattr(train_uamt, "uncertainty_threshold", lambda *args: 0.0)
    out, (x_l, y_l, x_u) = eval_step(method)
    with torch.no_grad():
        z = method.student(torch.cat([x_l, x_u]))[:2]
    y = y_l[:, 0]
    probs = F.softmax(z, 1)
    tp = (F.one_hot(y, 14).permute(0, 4, 1, 2, 3) * probs).sum((0, 2, 3, 4))[1:]
    size = (F.one_hot(y, 14).permute(0, 4, 1, 2, 3) + probs).sum((0, 2, 3, 4))[1:]  # 2TP + FP + FN
    dice = -((2 * tp + 1e-8) / (size + 1e-8 + 1e-8)).mean()  # smooth 1e-8, foreground, batch dice
    expected = 0.5 * (F.cross_entropy(z, y) + dice)
    assert out["cps"].item() == 0.0 and out["certain"].item() == 0.0
    assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_identical_deterministic_teacher_gives_zero_consistency(monkeypatch):
    method = make_method(UAMT)
    method.teacher.load_state_dict(method.student.state_dict())
    method.teacher.eval()
    monkeypatch.setattr(train_uamt, "gaussian_noise", torch.zeros_like)
    monkeypatch.setattr(train_uamt, "uncertainty_threshold", lambda *args: 1e9)  # every voxel certain
    out, _ = eval_step(method)
    assert out["certain"].item() == 1.0 and out["cps"].item() == pytest.approx(0.0, abs=1e-12)


def test_teacher_is_not_trained_and_stays_in_train_mode():
    method = make_method(UAMT)
    optimizers = engine.make_optimizers(method, 0.01)
    trained = {id(p) for opt in optimizers.values() for group in opt.param_groups for p in group["params"]}
    assert trained == {id(p) for p in method.student.parameters()}
    assert not any(p.requires_grad for p in method.teacher.parameters())
    cfg = method.cfg
    x_l, y_l, x_u = small_batch()
    torch.manual_seed(0)
    out = engine.optimize_step(method, optimizers, torch.amp.GradScaler("cpu", enabled=False), cfg, x_l, y_l, x_u,
                               engine.Step(0, 0, 0, 0.01, 0.1))
    assert torch.isfinite(out["loss"]) and 0 <= out["certain"].item() <= 1
    assert all(p.grad is None for p in method.teacher.parameters())
    assert all(torch.equal(t, s) for t, s in zip(method.teacher.parameters(), method.student.parameters()))
    assert method.teacher.training  # never switched to eval: dropout and batch statistics in every pass
    assert method.best_checkpoint().keys() == method.student.state_dict().keys()  # bare student


def test_multiclass_option_uses_ln_c_and_c(monkeypatch):
    seen = []
    real = train_uamt.uamt_consistency_loss
    monkeypatch.setattr(train_uamt, "uamt_consistency_loss",
                        lambda *args: seen.append(args[3:]) or real(*args))
    eval_step(make_method(UAMT))
    eval_step(make_method(UAMT, ["--uamt_entropy_scale", "multiclass", "-ep", "100"]), epoch=100)
    assert seen[0] == (pytest.approx((0.75 + 0.25 * math.exp(-5)) * LN2), 2)
    assert seen[1] == (pytest.approx(math.log(14)), 14)
