"""Helpers for the tests of the co-training baselines (cps, cls, crest, simis): a tiny method instance, nets
replaced by fixed logits (so pseudo-labels and histograms are chosen by the test), and the losses written out by
hand from their formulas (docs/methods.md#cps)."""
import numpy as np
import torch

from conftest import FAST
from engine import Step
from utils.runinfo import build_parser, resolve_config

C = 14  # the phantom task's classes (background + 13 organs)
EPS = 1e-8


def make_method(cls, *extra):
    torch.manual_seed(0)
    return cls(resolve_config(cls, build_parser(cls).parse_args(FAST + list(extra))))


class FixedLogits(torch.nn.Module):
    """A 'network' whose output is a learnable tensor, whatever the input."""

    def __init__(self, logits):
        super().__init__()
        self.logits = torch.nn.Parameter(logits.clone())

    def forward(self, x):
        return self.logits * 1.0


def logits_for(labels, scale=3.0, seed=0):
    """Logits [B, C, ...] whose argmax is ``labels`` [B, ...] (one-hot·scale plus noise below scale/2)."""
    g = torch.Generator().manual_seed(seed)
    one_hot = torch.nn.functional.one_hot(labels, C).movedim(-1, 1).float()
    return one_hot * scale + torch.rand(one_hot.shape, generator=g)


def hist(labels):
    """Voxel count per class, float64 numpy."""
    return np.bincount(np.asarray(labels).ravel(), minlength=C).astype(np.float64)


def hand_ce(z, t, w=None):
    """Σ_v w_{t_v}·(−log softmax(z)_{t_v}) / Σ_v w_{t_v} (plain mean when w is None); t [B, ...]."""
    logp = torch.log_softmax(z.double(), 1).movedim(1, -1).reshape(-1, C)
    t = t.reshape(-1)
    nll = -logp[torch.arange(t.numel()), t]
    wt = torch.ones_like(nll) if w is None else torch.as_tensor(w, dtype=torch.float64)[t]
    return (wt * nll).sum() / wt.sum()


def hand_dice_term(z, y, w=None):
    """−(1/(C−1))·Σ_{c≥1} w_c·(2TP_c + 1)/(2TP_c + FP_c + FN_c + 1 + 1e-8), soft TP/FP/FN over batch and space."""
    p = torch.softmax(z.double(), 1)
    onehot = torch.nn.functional.one_hot(y.reshape(p.shape[0], *p.shape[2:]), C).movedim(-1, 1).double()
    axes = [0] + list(range(2, p.dim()))
    tp = (p * onehot).sum(axes)
    fp, fn = p.sum(axes) - tp, onehot.sum(axes) - tp
    dc = (2 * tp + 1) / (2 * tp + fp + fn + 1 + 1e-8)
    weights = torch.ones(C, dtype=torch.float64) if w is None else torch.as_tensor(w, dtype=torch.float64)
    return -(weights[1:] * dc[1:]).mean()


def hand_sup(z, y, w=None):
    """The supervised loss S = CE + Dice term (weighted by w in both parts when given)."""
    return hand_ce(z, y, w) + hand_dice_term(z, y, w)


def batch_with_histograms(seed=0):
    """Pseudo-labels for A and B on a 2 + 2 batch of 2x4x4 volumes whose labeled and unlabeled halves have
    different histograms, the ground truth y [2, 1, 2, 4, 4], and fixed logits realising those argmaxes."""
    g = torch.Generator().manual_seed(seed)
    shape = (2, 4, 4)
    t_a = torch.cat([torch.zeros(2, *shape, dtype=torch.long),                     # labeled half: background
                     torch.randint(0, 5, (2, *shape), generator=g)])               # unlabeled half: classes 0-4
    t_b = torch.cat([torch.randint(0, C, (2, *shape), generator=g),
                     torch.randint(3, 9, (2, *shape), generator=g)])
    y = torch.randint(0, C, (2, 1, *shape), generator=g)
    return t_a, t_b, y, logits_for(t_a, seed=seed + 1), logits_for(t_b, seed=seed + 2)


def check_weighted_step(method_cls, reference_weights, labeled_init, count_labeled, lam=0.3):
    """One ``training_step`` of a class-weighted method on fixed logits against the formulas:
    w_n ← 0.99·w_n + 0.01·W(hist(own argmax on the counted part)), L_sup = Σ_n S_{w_n}(z_n[:2], y),
    L_cps = CE_{w_A}(z_A, argmax z_B) + CE_{w_B}(z_B, argmax z_A), L = L_sup + λ·L_cps; the gradient of L_cps
    reaches each net through its own logits only. Returns the method (for further checks)."""
    method = make_method(method_cls)
    labels = [np.repeat(np.arange(C), [4000] + [40 * c for c in range(1, C)])]
    method.on_train_start(labels)
    w0 = labeled_init(hist(labels[0]))
    for weighting in method.weighting.values():
        assert np.allclose(weighting.weights.numpy(), w0, rtol=1e-5, atol=1e-6)
    t_a, t_b, y, z_a, z_b = batch_with_histograms()
    nets = method.nets = {"A": FixedLogits(z_a), "B": FixedLogits(z_b)}
    x = torch.zeros(2, 1, 2, 4, 4)
    out = method.training_step(x, y, x, Step(0, 0, 0, 0.01, lam))
    part = slice(0 if count_labeled else 2, None)
    w_a = 0.99 * w0 + 0.01 * reference_weights(hist(t_a[part]))
    w_b = 0.99 * w0 + 0.01 * reference_weights(hist(t_b[part]))
    assert np.allclose(method.weighting["A"].weights.numpy(), w_a, rtol=1e-5, atol=1e-6)
    assert np.allclose(method.weighting["B"].weights.numpy(), w_b, rtol=1e-5, atol=1e-6)
    sup = hand_sup(z_a[:2], y, w_a) + hand_sup(z_b[:2], y, w_b)
    cps = hand_ce(z_a, t_b, w_a) + hand_ce(z_b, t_a, w_b)
    for key, expected in (("sup", sup), ("cps", cps), ("loss", sup + lam * cps)):
        assert abs(out[key].item() - expected.item()) <= 1e-5 * abs(expected.item()), key
    out["cps"].backward()
    z = z_a.clone().requires_grad_(True)
    hand_ce(z, t_b, w_a).backward()  # A's gradient: its own CE to B's (fixed) argmax, nothing else
    assert torch.allclose(nets["A"].logits.grad, z.grad, rtol=1e-5, atol=1e-9)
    return method
