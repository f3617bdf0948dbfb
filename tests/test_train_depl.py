"""DePL: causal-inference debiasing, the per-voxel q̂ EMA, mask and loss semantics, order of operations, the unused
adaptive marginal and its corrected option (docs/methods.md#depl)."""
import math

import pytest
import torch
import torch.nn.functional as F

import engine
import train_depl
from train_depl import DePL, causal_inference, initial_qhat, update_qhat
from test_methods_common import make_method, tiny_batch


def tiny_method(*extra):
    return make_method(DePL, extra)  # seeded, FAST flags on the phantom task (C = 14, patch 16x32x32)


def test_initial_qhat_is_uniform_with_the_patch_shape():
    q = initial_qhat(class_num=3, patch_size=(2, 4, 4))
    assert q.shape == (1, 3, 2, 4, 4) and q.dtype == torch.float32
    assert torch.equal(q, torch.full_like(q, 1 / 3))
    method = tiny_method()  # q̂ per net, shaped by --patch_size
    assert set(method.qhat) == {"A", "B"} and method.qhat["A"].shape == (1, 14, 16, 32, 32)


def test_uniform_qhat_changes_nothing():
    # idea 1: subtracting τ·log(1/C) everywhere is a constant shift: same softmax, same argmax
    z = torch.randn(2, 4, 2, 3, 3, generator=torch.Generator().manual_seed(0))
    debiased = causal_inference(z, initial_qhat(4, (2, 3, 3)), tau=1.0)
    assert torch.allclose(debiased, z + math.log(4), atol=1e-6)
    assert torch.allclose(torch.softmax(debiased, 1), torch.softmax(z, 1), atol=1e-6)
    assert torch.equal(debiased.argmax(1), z.argmax(1))


def test_skewed_qhat_flips_the_argmax_and_divides_by_qhat():
    # idea 2, one voxel: z = [2, 1, 0], q̂ = [0.8, 0.1, 0.1], τ = 1
    # z − log q̂ = [2 − log .8, 1 − log .1, −log .1] = [2.2231, 3.3026, 2.3026] -> argmax 1 (plain argmax 0)
    z = torch.tensor([2.0, 1.0, 0.0]).view(1, 3, 1, 1, 1)
    q = torch.tensor([0.8, 0.1, 0.1]).view(1, 3, 1, 1, 1)
    debiased = causal_inference(z, q, tau=1.0)
    assert torch.allclose(debiased.flatten(), torch.tensor([2.2231436, 3.3025851, 2.3025851]), atol=1e-6)
    assert debiased.argmax(1).item() == 1 and z.argmax(1).item() == 0
    p = torch.softmax(z, 1) / q                                     # p̃ ∝ softmax(z) / q̂
    assert torch.allclose(torch.softmax(debiased, 1), p / p.sum(1, keepdim=True), atol=1e-6)
    # the helper's default τ is 0.5: z − 0.5·log q̂
    assert torch.allclose(causal_inference(z, q), z - 0.5 * torch.log(q))


def test_update_qhat_one_step_closed_form():
    # idea 3: q̂₁ = 0.99/C + 0.01·mean_b softmax(z_u), per voxel; a distribution over C; no gradient
    g = torch.Generator().manual_seed(2)
    z = torch.randn(2, 3, 2, 2, 2, generator=g, requires_grad=True)
    probs = torch.softmax(z, 1)
    q1 = update_qhat(probs, initial_qhat(3, (2, 2, 2)), momentum=0.99)
    expected = 0.99 / 3 + 0.01 * (probs[0] + probs[1]).detach() / 2
    assert q1.shape == (1, 3, 2, 2, 2) and not q1.requires_grad
    assert torch.allclose(q1[0], expected, atol=1e-7)
    assert torch.allclose(q1.sum(1), torch.ones(1, 2, 2, 2), atol=1e-6)
    # a voxel where both samples are confident in class 2 moves its q̂ towards class 2 only
    assert torch.allclose(update_qhat(torch.eye(3)[[2, 2]].view(2, 3, 1, 1, 1), torch.full((1, 3, 1, 1, 1), 1 / 3))
                          .flatten(), torch.tensor([0.99 / 3, 0.99 / 3, 0.99 / 3 + 0.01]), atol=1e-7)


def test_threshold_is_inclusive_and_loss_is_a_plain_voxel_mean(monkeypatch):
    # idea 5: a voxel whose debiased max probability equals the threshold is kept (≥)
    method = tiny_method()
    z = torch.tensor([[3.0, 0.5, 0.0], [0.1, 0.0, 0.2]]).T.reshape(1, 3, 1, 1, 2)
    method.qhat["A"] = torch.full((1, 3, 1, 1, 2), 1 / 3)
    top = torch.softmax(causal_inference(z, method.qhat["A"], 1.0), 1).max(1).values[0, 0, 0, 0]
    monkeypatch.setattr(train_depl, "THRESHOLD", top.item())
    target, mask = method.pseudo_labels(z, "A")
    assert target.flatten().tolist() == [0, 2] and mask.flatten().tolist() == [1.0, 0.0]
    above = torch.nextafter(top, torch.tensor(1.0)).item()  # the next float32 (the comparison runs in float32)
    monkeypatch.setattr(train_depl, "THRESHOLD", above)
    assert method.pseudo_labels(z, "A")[1].flatten().tolist() == [0.0, 0.0]
    # L = Σ m·CE / (B·D·H·W), not divided by Σ m
    logits = torch.randn(2, 3, 1, 2, 2, generator=torch.Generator().manual_seed(3))
    t = torch.randint(0, 3, (2, 1, 2, 2), generator=torch.Generator().manual_seed(4))
    m = torch.tensor([1.0, 0, 0, 1, 0, 0, 0, 1]).view(2, 1, 2, 2)
    ce = F.cross_entropy(logits, t, reduction="none")
    assert method.cross_ce(logits, t, weight_map=m).item() == pytest.approx(((ce * m).sum() / 8).item(), rel=1e-6)


def test_pseudo_labels_use_last_iterations_qhat_then_qhat_updates_from_unlabeled_half(monkeypatch):
    # idea 4: the labels of iteration k see q̂ after k − 1 updates; the update uses softmax of z[n_l:] only
    method = tiny_method()
    x_l, y_l, x_u = tiny_batch()
    seen = []
    original = train_depl.causal_inference
    monkeypatch.setattr(train_depl, "causal_inference", lambda z, q, tau: seen.append(q.clone()) or original(z, q, tau))
    captured = {}
    forward = method.forward_both
    monkeypatch.setattr(method, "forward_both", lambda a, b: captured.setdefault(len(captured), forward(a, b)))
    for i in range(2):
        method.training_step(x_l, y_l, x_u, engine.Step(0, i, i, 1e-3, 1.0))
    q0 = initial_qhat(14, (16, 32, 32))
    assert torch.equal(seen[0], q0) and torch.equal(seen[1], q0)        # iteration 1: A then B, both uniform
    z_a1 = captured[0][0].detach()
    q1_a = update_qhat(torch.softmax(z_a1[2:], 1), q0, 0.99)
    assert torch.equal(seen[2], q1_a)                                      # iteration 2 uses one update
    z_a2 = captured[1][0].detach()
    assert torch.equal(method.qhat["A"], update_qhat(torch.softmax(z_a2[2:], 1), q1_a, 0.99))
    assert not torch.equal(method.qhat["A"], method.qhat["B"])              # one q̂ per net


def test_marginal_unused_by_default_and_used_with_the_option():
    # idea 6: faithful mode ignores q̂ in the cross loss; 'own' adds τ·log q̂ to the unlabeled half only
    z = torch.randn(4, 14, 16, 32, 32, generator=torch.Generator().manual_seed(5))
    method = tiny_method()
    method.qhat["A"] = torch.softmax(torch.randn(1, 14, 16, 32, 32), 1)
    assert method.marginal_logits(z, "A", 2) is z
    own = tiny_method("--depl_marginal", "own")
    own.qhat["A"] = method.qhat["A"]
    adjusted = own.marginal_logits(z, "A", 2)
    assert torch.equal(adjusted[:2], z[:2]) and torch.allclose(adjusted[2:], z[2:] + torch.log(own.qhat["A"]))
    peer = tiny_method("--depl_marginal", "peer")
    peer.qhat["B"] = method.qhat["A"]
    assert torch.allclose(peer.marginal_logits(z, "A", 2)[2:], adjusted[2:])


def test_lambda_zero_gives_the_supervised_loss_and_cross_loss_matches_the_formula():
    method = tiny_method()
    x_l, y_l, x_u = tiny_batch()
    out = method.training_step(x_l, y_l, x_u, engine.Step(0, 0, 0, 1e-3, 0.0))
    assert out["loss"].item() == pytest.approx(out["sup"].item(), rel=1e-7)
    # with uniform q̂ the first iteration's labels are the plain argmax, kept where softmax max >= 0.9
    method = tiny_method()
    for net in method.nets.values():
        net.eval()  # no dropout: the step's forward gives the same logits
    out = method.training_step(x_l, y_l, x_u, engine.Step(0, 0, 0, 1e-3, 1.0))
    with torch.no_grad():
        z_a, z_b, _ = method.forward_both(x_l, x_u)
    expected = 0
    for student, teacher in ((z_a, z_b), (z_b, z_a)):
        conf, t = torch.softmax(teacher, 1).max(1)
        expected = expected + (F.cross_entropy(student, t, reduction="none") * (conf >= 0.9)).mean()
    assert out["cps"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_state_dict_round_trip_restores_qhat():
    method = tiny_method()
    x_l, y_l, x_u = tiny_batch()
    method.training_step(x_l, y_l, x_u, engine.Step(0, 0, 0, 1e-3, 1.0))
    other = tiny_method()
    other.load_state_dict(method.state_dict())
    assert all(torch.equal(other.qhat[k], method.qhat[k]) for k in "AB")
    assert not torch.equal(other.qhat["A"], initial_qhat(14, (16, 32, 32)))
