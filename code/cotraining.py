"""Two networks that teach each other: the shared shape of DHC and its co-training baselines (docs/methods.md).

``CoTraining`` owns what every two-net method of the paper's table repeats: networks ``A`` and ``B`` built through
``models.build_network(self.network, …)`` (so ``run.json`` records by construction what was trained), constructed both
and *then* initialised (the original's order, which fixes the seeded draws; Q38 in docs/original-quirks.md), one
forward of each net over the labeled-first batch ``cat([x_l, x_u])``, detached hard pseudo-labels, and the CPS pair of
losses

    L_sup = S_A(z_A[:n_l], y) + S_B(z_B[:n_l], y),   L_cps = C_A(z_A, ŷ_B) + C_B(z_B, ŷ_A)

with optional per-net class weights pushed into both losses of a net (DHC, CReST, SimiS, CLS). A method file adds
only its own state and its ``training_step``. ``ClassWeightedCoTraining`` is the whole step for methods whose
nets weight classes from the histogram of their own argmax (CLS, CReST, SimiS): they add only the weighting.
"""
import copy

import torch

from engine import Method
from utils.init import kaiming_normal_init_weight, xavier_normal_init_weight
from utils.loss import make_loss_function

INITS = {"kaiming": kaiming_normal_init_weight, "xavier": xavier_normal_init_weight, "default": lambda net: net}


def hard_labels(logits):
    """Detached argmax over classes: ``[B, C, D, H, W]`` logits -> ``[B, D, H, W]`` int64 pseudo-labels."""
    return logits.detach().argmax(1)


class CoTraining(Method):
    """Nets ``A`` and ``B`` (checkpoint ``{'A', 'B'}``), validation and test on the mean of their logits.

    Class attributes a subclass may change: ``network`` (a ``models.build_network`` name), ``init_a`` / ``init_b``
    (``"kaiming"``, ``"xavier"`` or ``"default"``; CPS-style methods use kaiming for A and xavier for B, DHC kaiming
    for both), ``has_dropout`` (the original trains with Dropout3d on). Networks come from ``Method.build_net``.
    """
    init_a, init_b = "kaiming", "xavier"

    def __init__(self, cfg):
        super().__init__(cfg)
        net_a, net_b = self.build_net(), self.build_net()  # both constructed, then both re-initialised (Q38 order)
        self.nets = {"A": INITS[self.init_a](net_a), "B": INITS[self.init_b](net_b)}
        self.sup_losses = {k: make_loss_function(cfg.sup_loss) for k in self.nets}
        self.cps_losses = {k: make_loss_function(cfg.cps_loss) for k in self.nets}

    def forward_both(self, x_l, x_u):
        """``(z_A, z_B, n_l)``: both nets on the labeled-first batch ``cat([x_l, x_u])`` (train mode)."""
        x = torch.cat([x_l, x_u])
        return self.nets["A"](x), self.nets["B"](x), x_l.shape[0]

    def cps_pair(self, logits_a, logits_b, y_l, n_l, w_a=None, w_b=None):
        """``(L_sup, L_cps)`` with the ``--sup_loss`` / ``--cps_loss`` functions; ``w_a`` / ``w_b`` (length-C class
        weights, or None for unweighted) go into both losses of that net. Pseudo-labels cover the whole batch."""
        for name, weight in (("A", w_a), ("B", w_b)):
            if weight is not None:
                self.sup_losses[name].update_weight(weight)
                self.cps_losses[name].update_weight(weight)
        pseudo_a, pseudo_b = hard_labels(logits_a).unsqueeze(1), hard_labels(logits_b).unsqueeze(1)
        loss_sup = self.sup_losses["A"](logits_a[:n_l], y_l) + self.sup_losses["B"](logits_b[:n_l], y_l)
        loss_cps = self.cps_losses["A"](logits_a, pseudo_b) + self.cps_losses["B"](logits_b, pseudo_a)
        return loss_sup, loss_cps

    def zero_weight_ce_terms(self):
        """How many weighted CE terms so far had all-zero target weights and gave 0 instead of NaN (docs/methods.md)."""
        ce_terms = [getattr(loss, "ce", loss) for loss in (*self.sup_losses.values(), *self.cps_losses.values())]
        return sum(int(ce.zero_weight_batches) for ce in ce_terms if hasattr(ce, "zero_weight_batches"))


class ClassWeightedCoTraining(CoTraining):
    """CPS in which each net carries its own EMA class weights, computed from the histogram of *its own* argmax
    and pushed into both of its losses before they are evaluated (docs/methods.md#cls, #crest, #simis).

    A subclass sets ``weighting_cls``: ``(num_cls, do_bg=…, momentum=…)`` -> an object with ``init_weights(labels)``,
    ``get_ema_weights(logits)`` (returns the updated ``[C]`` weights) and ``state_dict()`` / ``load_state_dict()``;
    one per net, built as the original scripts do (``do_bg=True``, momentum 0.99). ``count_labeled``: whether the
    labeled half of the batch enters the histogram (SimiS) or only the unlabeled half does (CReST, CLS). Both nets
    start from the weights of the labeled set.
    """
    weighting_cls = None
    count_labeled = False

    def make_weighting(self):
        return self.weighting_cls(self.cfg.num_cls, do_bg=True, momentum=0.99)

    def __init__(self, cfg):
        super().__init__(cfg)
        self.weighting = {name: self.make_weighting() for name in self.nets}

    def on_train_start(self, labeled_ds):
        first, *others = self.weighting.values()
        first.init_weights(labeled_ds)  # one pass over the stored labels; the other nets copy the result
        for weighting in others:
            weighting.load_state_dict(copy.deepcopy(first.state_dict()))

    def training_step(self, x_l, y_l, x_u, step):
        logits_a, logits_b, n_l = self.forward_both(x_l, x_u)
        counted = slice(0 if self.count_labeled else n_l, None)
        w_a = self.weighting["A"].get_ema_weights(logits_a[counted].detach())  # before the losses, own argmax
        w_b = self.weighting["B"].get_ema_weights(logits_b[counted].detach())
        loss_sup, loss_cps = self.cps_pair(logits_a, logits_b, y_l, n_l, w_a, w_b)
        return {"loss": loss_sup + step.unsup_w * loss_cps, "sup": loss_sup, "cps": loss_cps}

    def on_epoch_end(self, epoch):
        """The last iteration's class weights of each net, and the count of all-zero-weight CE terms so far."""
        return {**{f"class_weights/{name}": w.weights for name, w in self.weighting.items()},
                "zero_weight_ce_terms": self.zero_weight_ce_terms()}

    def state_dict(self):
        return {**super().state_dict(), "weighting": {name: w.state_dict() for name, w in self.weighting.items()}}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        for name, weighting in self.weighting.items():
            weighting.load_state_dict(state["weighting"][name])
