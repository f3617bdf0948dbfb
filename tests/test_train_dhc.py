"""DHC: DistDW and DiffDW against hand computation, weights flowing into the losses, detached pseudo-labels,
checkpoint layout (docs/methods.md#dhc; Qn: docs/original-quirks.md)."""
import math

import numpy as np
import pytest
import torch

from train_dhc import DHC, DiffDW, DistDW
from utils.runinfo import build_parser, resolve_config

EPS = 1e-8


def tiny_cfg(*extra):
    argv = ["--task", "phantom", "--n_filters", "4", "--patch_size", "16", "32", "32", "--device", "cpu", *extra]
    return resolve_config(DHC, build_parser(DHC).parse_args(argv))


# ------------------------------------------------------------------------------------------------ DistDW

def test_distdw_init_matches_spec_example():
    # (D1)-(D3): N = [100, 10, 1], C = 3 -> ω = [0, 0.5, 1] -> weights C·ω = [0, 1.5, 3].
    label = np.array([0] * 100 + [1] * 10 + [2] * 1)
    w = DistDW(3).init_weights([label[:50], label[50:]])  # counts summed over volumes
    assert torch.allclose(w, torch.tensor([0.0, 1.5, 3.0]), atol=1e-6)


def test_distdw_absent_class_gets_full_weight():
    # N = [100, 10, 0]: R_2 = (100 + ε)/ε -> ω_2 = 1; ω_1 = log(10) / log(1e10 + 1).
    label = np.array([0] * 100 + [1] * 10)
    w = DistDW(3).init_weights([label])
    expected_1 = 3 * math.log(10) / math.log((100 + EPS) / EPS)
    assert w[0] == 0 and w[2] == pytest.approx(3.0) and w[1] == pytest.approx(expected_1, rel=1e-5)


def test_distdw_equal_counts_gives_zero_not_nan():
    w = DistDW(3).init_weights([np.array([0, 1, 2, 0, 1, 2])])
    assert torch.equal(w, torch.zeros(3))


def test_distdw_two_ema_steps_closed_form():
    dist = DistDW(3, momentum=0.99)
    w0 = dist.init_weights([np.array([0] * 100 + [1] * 10 + [2])])  # [0, 1.5, 3]
    # pseudo-label counts [8, 4, 2] and then [8, 2, 4] via logits whose argmax we control
    def logits_for(counts):
        labels = torch.tensor(sum(([c] * n for c, n in enumerate(counts)), []))
        return torch.nn.functional.one_hot(labels, 3).T.float().reshape(1, 3, 1, 1, -1)
    def cur(counts):
        logs = [math.log(max(counts) / n) for n in counts]
        return np.array([3 * l / max(logs) for l in logs])
    w1 = dist.get_ema_weights(logits_for([8, 4, 2]))
    exp1 = 0.99 * w0.numpy() + 0.01 * cur([8, 4, 2])          # cur = [0, 1.5, 3]
    w2 = dist.get_ema_weights(logits_for([8, 2, 4]))
    exp2 = 0.99 * exp1 + 0.01 * cur([8, 2, 4])                # cur = [0, 3, 1.5]
    assert np.allclose(w1.numpy(), exp1, atol=1e-6) and np.allclose(w2.numpy(), exp2, atol=1e-6)
    assert w2[0] == 0  # background (majority) stays exactly 0 (Q29)


# ------------------------------------------------------------------------------------------------ DiffDW

def hard_dice_reference(pred, gt, C):
    """(F1) by explicit counting: batch Dice, background included, ε = 1e-8."""
    out = []
    for c in range(C):
        p, g = pred == c, gt == c
        tp, fp, fn = np.sum(p & g), np.sum(p & ~g), np.sum(~p & g)
        out.append((2 * tp + EPS) / (2 * tp + fp + fn + EPS + EPS))
    return np.array(out)


def diffdw_reference(batches, C, beta=0.98):
    prev, L, U, M = np.full(C, EPS), np.zeros(C), np.zeros(C), np.ones(C)
    out = []
    for pred, gt in batches:
        D = hard_dice_reference(pred, gt, C)
        delta, r = D - prev, np.log(D / prev)
        L = beta * L + (1 - beta) * np.where(delta > 0, delta * r, 0)
        U = beta * U + (1 - beta) * np.where(delta <= 0, delta * r, 0)
        prev = D
        M = beta * M + (1 - beta) * (1 - D)
        wm = ((U + EPS) / (L + EPS)) ** 0.2 * M
        out.append(C * wm / wm.max())
    return out


def logits_from(pred, C):
    return torch.nn.functional.one_hot(torch.as_tensor(pred), C).movedim(-1, 1).float() * 5


def test_diffdw_two_steps_match_hand_formula():
    rng = np.random.default_rng(0)
    C = 3
    batches = []
    for _ in range(3):
        gt = rng.integers(0, C, size=(2, 4, 6, 6))
        pred = np.where(rng.random(gt.shape) < 0.7, gt, rng.integers(0, C, size=gt.shape))
        batches.append((pred, gt))
    diff = DiffDW(C, accumulate_iters=50)
    assert torch.equal(diff.init_weights(), torch.full((C,), 3.0))
    got = [diff.cal_weights(logits_from(p, C), torch.as_tensor(g).unsqueeze(1)) for p, g in batches]
    for g, e in zip(got, diffdw_reference(batches, C)):
        assert np.allclose(g.numpy(), e, rtol=1e-4)
        assert g.max().item() == pytest.approx(C)  # (F8): max weight exactly C


def test_diffdw_absent_class_dice_half():
    # class 2 absent from both prediction and GT: D_2 = ε / 2ε = 0.5 (Q32)
    gt = np.array([[[[0, 1, 1, 0]]]])
    diff = DiffDW(3)
    diff.init_weights()
    diff.cal_weights(logits_from(gt, 3), torch.as_tensor(gt))
    assert diff.dice_prev.tolist() == pytest.approx([1.0, 1.0, 0.5])


# ------------------------------------------------------------------------------------------------ the step

@pytest.fixture(scope="module")
def dhc_and_batch():
    torch.manual_seed(0)
    method = DHC(tiny_cfg())
    C = method.cfg.num_cls
    labels = [np.repeat(np.arange(C), [1000] + [10 * c for c in range(1, C)])]
    method.on_train_start(labels)
    x_l, x_u = torch.randn(2, 1, 16, 32, 32), torch.randn(2, 1, 16, 32, 32)
    y_l = torch.randint(0, C, (2, 1, 16, 32, 32))
    return method, x_l, y_l, x_u


def test_checkpoint_keys_exactly_a_b(dhc_and_batch):
    method = dhc_and_batch[0]
    ckpt = method.best_checkpoint()
    assert set(ckpt) == {"A", "B"} and len(ckpt["A"]) == 205


def test_training_step_pushes_weights_into_both_losses(dhc_and_batch):
    from engine import Step
    method, x_l, y_l, x_u = dhc_and_batch
    out = method.training_step(x_l, y_l, x_u, Step(0, 0, 0, 0.01, 0.5))
    assert out["loss"].item() == pytest.approx((out["sup"] + 0.5 * out["cps"]).item(), rel=1e-6)
    assert method.w_b is method.dist_dw.weights and method.w_a.shape == (method.cfg.num_cls,)
    assert method.w_a.max().item() == pytest.approx(method.cfg.num_cls)
    assert method.sup_losses["A"].ce.weight is not None
    assert torch.equal(torch.as_tensor(method.cps_losses["A"].weight), method.w_a)
    assert torch.equal(torch.as_tensor(method.cps_losses["B"].weight), method.w_b)


def test_pseudo_labels_carry_no_gradient_to_the_other_net(dhc_and_batch):
    from utils.loss import RobustCrossEntropyLoss
    method, x_l, _, x_u = dhc_and_batch
    x = torch.cat([x_l, x_u])
    logits_a, logits_b = method.nets["A"](x), method.nets["B"](x)
    for net in method.nets.values():
        net.zero_grad(set_to_none=True)
    RobustCrossEntropyLoss()(logits_a, logits_b.detach().argmax(1, keepdim=True)).backward()
    assert all(p.grad is None for p in method.nets["B"].parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in method.nets["A"].parameters())


def test_state_dict_round_trip_gives_identical_next_weights(dhc_and_batch):
    method, x_l, y_l, x_u = dhc_and_batch
    state = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in method.state_dict().items()}
    logits = torch.randn(2, method.cfg.num_cls, 4, 4, 4)
    w_first = method.diff_dw.cal_weights(logits, y_l[:, :, :4, :4, :4])
    method.load_state_dict(state)
    w_again = method.diff_dw.cal_weights(logits, y_l[:, :, :4, :4, :4])
    assert torch.equal(w_first, w_again)


def test_importing_parses_nothing():
    import subprocess
    import sys
    code = "import sys; sys.argv=['x','--bogus']; import train_dhc, engine; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={"PYTHONPATH": "code:.", "PATH": ""}, cwd=__file__.rsplit("/tests/", 1)[0])
    assert out.stdout.strip() == "ok", out.stderr
