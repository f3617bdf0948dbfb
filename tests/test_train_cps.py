"""cps (docs/methods.md#cps): the unweighted supervised loss and CPS term against their formulas, λ = 0, pseudo-
labels without gradient, identical nets, init and checkpoint layout, and the original script's defaults."""
import math

import pytest
import torch

from cotraining_helpers import C, FixedLogits, batch_with_histograms, hand_ce, hand_sup, make_method
from engine import Step
from train_cps import CPS
from utils.ramps import unsup_weight_at_epoch


def tiny_batch():
    g = torch.Generator().manual_seed(1)
    return (torch.rand(2, 1, 16, 16, 16, generator=g), torch.randint(0, C, (2, 1, 16, 16, 16), generator=g),
            torch.rand(2, 1, 16, 16, 16, generator=g))


def test_step_on_fixed_logits_equals_the_formulas():
    # L = [CE + Dice](z_A[:2], y) + [CE + Dice](z_B[:2], y) + λ·[CE(z_A, argmax z_B) + CE(z_B, argmax z_A)],
    # Dice term = −mean_{c≥1} (2TP+1)/(2TP+FP+FN+1+1e-8), everything unweighted
    method = make_method(CPS)
    t_a, t_b, y, z_a, z_b = batch_with_histograms()
    method.nets = {"A": FixedLogits(z_a), "B": FixedLogits(z_b)}
    x = torch.zeros(2, 1, 2, 4, 4)
    out = method.training_step(x, y, x, Step(0, 0, 0, 0.01, 0.25))
    sup = hand_sup(z_a[:2], y) + hand_sup(z_b[:2], y)
    cps = hand_ce(z_a, t_b) + hand_ce(z_b, t_a)
    assert out["sup"].item() == pytest.approx(sup.item(), rel=1e-6)
    assert out["cps"].item() == pytest.approx(cps.item(), rel=1e-6)
    assert out["loss"].item() == pytest.approx((sup + 0.25 * cps).item(), rel=1e-6)
    out["cps"].backward()  # A learns from B's argmax only: its gradient is softmax(z_A) − onehot(t_B), over N voxels
    expected = (torch.softmax(z_a, 1) - torch.nn.functional.one_hot(t_b, C).movedim(-1, 1)) / t_b.numel()
    assert torch.allclose(method.nets["A"].logits.grad, expected, atol=1e-7)


def test_lambda_zero_gives_the_supervised_loss_and_b_ignores_a():
    method = make_method(CPS)
    x_l, y_l, x_u = tiny_batch()

    def b_grads_and_loss():
        for net in method.nets.values():
            net.zero_grad(set_to_none=True)
        torch.manual_seed(5)  # same dropout masks every time
        out = method.training_step(x_l, y_l, x_u, Step(0, 0, 0, 0.01, 0.0))
        out["loss"].backward()
        return [p.grad.clone() for p in method.nets["B"].parameters()], out

    grads, out = b_grads_and_loss()
    assert out["loss"].item() == pytest.approx(out["sup"].item(), rel=1e-7) and out["cps"].item() > 0
    with torch.no_grad():  # another A: B's gradient must not change
        for p in method.nets["A"].parameters():
            p.add_(0.1 * torch.randn_like(p))
    grads_after, _ = b_grads_and_loss()
    assert all(torch.equal(a, b) for a, b in zip(grads, grads_after))


def test_identical_nets_give_twice_the_self_cross_entropy():
    method = make_method(CPS)
    method.nets["B"].load_state_dict(method.nets["A"].state_dict())
    for net in method.nets.values():
        net.eval()
    x_l, y_l, x_u = tiny_batch()
    with torch.no_grad():
        out = method.training_step(x_l, y_l, x_u, Step(0, 0, 0, 0.01, 1.0))
        z = method.nets["A"](torch.cat([x_l, x_u]))
    assert out["cps"].item() == pytest.approx(2 * hand_ce(z, z.argmax(1)).item(), rel=1e-5)


def test_init_kaiming_a_xavier_b_and_checkpoint_layout():
    method = make_method(CPS)
    fan = 64 * 27  # block_five conv: 16F -> 16F, 3x3x3, F = 4
    std_a = method.nets["A"].block_five.conv[0].weight.std().item()
    std_b = method.nets["B"].block_five.conv[0].weight.std().item()
    assert std_a == pytest.approx(math.sqrt(2 / fan), rel=0.05) and std_b == pytest.approx(math.sqrt(1 / fan), rel=0.05)
    ckpt = method.best_checkpoint()
    assert set(ckpt) == {"A", "B"} and len(ckpt["A"]) == len(ckpt["B"]) == 205
    assert method.state_dict() == {"aux": {}}  # no method state besides the nets


def test_defaults_and_ramp_are_the_original_scripts():
    cfg = make_method(CPS).cfg
    assert (cfg.base_lr, cfg.cps_w, cfg.rampup_length) == (1e-3, 1.0, None)  # -w 1, -r off
    ramped = make_method(CPS, "-r", "-w", "0.1", "-ep", "200").cfg  # what the three-seed scripts pass
    # epoch e trains with λ(max(e − 1, 0)) = w·exp(−5(1 − (e−1)/T)²)
    for e in (0, 1, 101, 201):
        expected = 0.1 * math.exp(-5 * (1 - max(e - 1, 0) / 200) ** 2)
        assert unsup_weight_at_epoch(e, ramped.cps_w, ramped.rampup_length) == pytest.approx(expected)
