"""ACISIS: Addressing Class Imbalance in Semi-supervised Image Segmentation (Basak, Ghosal & Sarkar, MICCAI 2022,
arXiv 2209.00123), as the DHC authors ported it to 3D.

A mean teacher whose unlabeled loss samples voxels per class: three confidence metrics recorded on the labeled
half during an epoch are fused by a Gompertz fuzzy rank into a class confidence (EMA), rarely-confident classes
get high sampling rates, and each unlabeled voxel of the student's predicted class c enters the CE to the teacher's
hard pseudo-label with probability rate_c, weighted by the student's max-probability^1.5.
Spec: docs/methods.md#acisis, (acisis-1)-(acisis-7); the student/EMA-teacher machinery is
``meanteacher.MeanTeacher``.

Faithful on purpose (docs/methods.md#acisis): with [B, 1, ...] labels the metrics pair every sample's
probabilities with every sample's class mask (``--acisis_record per_sample`` pairs each sample with its own);
the "entropy" metric is p_c·Σ_k log p_k; rates are updated inside the last iteration of each epoch; the EMA's
global step is the epoch; both nets kaiming-initialised with independent draws.
"""
import math

import torch
import torch.nn.functional as F

from engine import run
from meanteacher import MeanTeacher, update_ema_variables  # noqa: F401  (public API of this module)
from utils.distributed import all_reduce_sum, world_size
from utils.loss import WeightedCrossEntropyLoss, make_loss_function
from utils.ramps import ema

P_FR = 0.632   # fuzzy-rank penalty of the classes outside a metric's top m (≈ G(0) = 1 − 1/e)
P_CCF = 0.0    # their contribution to the confidence factor


def gompertz(r):
    """(acisis-3) ``G(r) = 1 − exp(−exp(−2r))``: decreasing, G(0) = 1 − 1/e, G(1) ≈ 0.1266."""
    return 1 - torch.exp(-torch.exp(-2.0 * r))


def fuzzy_rank(g, top_m):
    """(acisis-3) Per metric (row), keep G of the ``top_m`` classes with the smallest G (ties at the cut all kept),
    P_FR elsewhere. ``top_m`` is clamped to the number of classes (the original crashes above it)."""
    top_m = min(top_m, g.shape[1])
    cut = g.sort(1).values[:, top_m - 1:top_m]
    return torch.where(g <= cut, g, torch.full_like(g, P_FR))


class ConfidenceArray:
    """Class-wise confidence metrics of the labeled predictions -> per-class sampling rates (acisis-1)-(acisis-6).

    State (all in ``state_dict``): accumulators ``entropy``, ``confidence``, ``variance`` [C], ``cur_iter``,
    the class confidence ``cc`` [C] (EMA, starts at 0) and ``rate`` [C] (starts at 1). ``update_iter``: the
    iterations between rate updates (one epoch). ``broadcast``: the original's cross-sample pairing (acisis-2).
    """

    def __init__(self, num_cls, momentum=0.99, update_iter=1, top_m=12, power=2.5, beta=1.5, broadcast=True):
        self.num_cls, self.momentum, self.update_iter = num_cls, momentum, update_iter
        self.top_m, self.power, self.beta, self.broadcast = top_m, power, beta, broadcast
        self.cc, self.rate = torch.zeros(num_cls), torch.ones(num_cls)
        self._reset()

    def _reset(self):
        zeros = torch.zeros(self.num_cls, device=self.cc.device)
        self.entropy, self.confidence, self.variance, self.cur_iter = zeros, zeros.clone(), zeros.clone(), 0

    @torch.no_grad()
    def record_data(self, out, gt):
        """(acisis-1)-(acisis-2) Accumulate the three metrics from labeled logits ``out`` [B, C, ...] and labels
        ``gt`` ([B, 1, ...] or [B, ...]), each normalised by the class's voxel count ``N_c`` (+1e-12):
        ``E_c = Σ p_c·Σ_k log(p_k + 1e-12)·[g = c]``, ``Cf_c = Σ p_c·[g = c]``, ``V_c = Σ (max_k p_k − p_c)·[g = c]``.
        With ``broadcast`` and [B, 1, ...] labels the sums run over all sample pairs (i, j), mask of i times
        metric of j, as the original's broadcasting does; otherwise over each sample with its own mask."""
        p = F.softmax(out.float(), 1)
        labels = gt if gt.dim() == p.dim() else gt.unsqueeze(1)
        onehot = torch.zeros_like(p).scatter_(1, labels.long(), 1)
        count = all_reduce_sum(onehot.sum((0, *range(2, p.dim())))) + 1e-12  # torchrun: sums over every rank
        cross = self.broadcast and gt.dim() == p.dim()
        space = tuple(range(1, p.dim() - 1))  # spatial dims of a [C, ...] tensor
        mask_sum = all_reduce_sum(onehot.sum(0)) if cross else None

        def paired_sum(metric):  # [B, C, ...] -> [C]
            if cross:  # Σ_v (Σ_i mask_i)(Σ_j metric_j) = Σ_{i,j,v} mask_i·metric_j
                return (mask_sum * all_reduce_sum(metric.sum(0))).sum(space)
            return all_reduce_sum((onehot * metric).sum(0).sum(space))

        self._to(p.device)
        self.entropy += paired_sum(p * torch.log(p + 1e-12).sum(1, keepdim=True)) / count
        self.confidence += paired_sum(p) / count
        self.variance += paired_sum(p.max(1, keepdim=True).values - p) / count
        self.cur_iter += 1

    def _to(self, device):
        for key in ("entropy", "confidence", "variance", "cc", "rate"):
            setattr(self, key, getattr(self, key).to(device))

    @torch.no_grad()
    def cal_sampling_rate(self):
        """(acisis-3)-(acisis-5) When ``update_iter`` records have been made: fuse the mean metrics into the class
        confidence ``cc ← m·cc + (1 − m)·cur`` and set ``rate = ((1 − cc)/(max(1 − cc) + 1e-12))^power``, then reset
        the accumulators. Returns the current rates [C] (unchanged between updates)."""
        if self.cur_iter != self.update_iter:
            return self.rate
        r = F.softmax(torch.stack([self.entropy, self.confidence, self.variance]) / self.cur_iter, 1).double()
        kept = fuzzy_rank(gompertz(r), self.top_m)                    # (acisis-3)
        fr = kept.sum(0)
        ccf = 1 - torch.where(kept == P_FR, torch.full_like(r, P_CCF), r).sum(0) / r.shape[0]  # (acisis-4)
        cur = (ccf * fr).float()
        self.cc = ema(cur / cur.max(), self.cc, self.momentum)
        self._reset()
        rate = 1 - self.cc
        self.rate = (rate / (rate.max() + 1e-12)) ** self.power        # (acisis-5)
        return self.rate

    @torch.no_grad()
    def cal_sampling_mask(self, out, min_sr=0.0):
        """(acisis-6) From unlabeled logits ``out`` [B, C, ...]: a voxel predicted as class c is kept with probability
        rate_c (``u > 1 − rate_c``, u ~ U(0, 1) per voxel; foreground rates clamped below at ``min_sr``) and
        weighted by its max-probability^beta. Returns the weight map [B, ...]."""
        q, pred = F.softmax(out.float(), 1).max(1).values, out.argmax(1)
        rate = self.rate.to(out.device)
        rate = torch.cat([rate[:1], rate[1:].clamp(min=min_sr)])
        kept = torch.rand(q.shape, device=out.device) > 1 - rate[pred]
        return kept.float() * q ** self.beta

    def state_dict(self):
        return {k: getattr(self, k) for k in ("entropy", "confidence", "variance", "cur_iter", "update_iter",
                                               "cc", "rate")}

    def load_state_dict(self, state):
        for key, value in state.items():
            setattr(self, key, value)


class ACISIS(MeanTeacher):
    """ACISIS: student VNet + EMA teacher, confidence-driven class-wise sampling of the unlabeled CE."""
    name = "acisis"
    init = "kaiming"  # both nets, independent draws

    @classmethod
    def add_args(cls, parser):
        super().add_args(parser)
        # the original script's names; unweighted either way (no weight is passed), --cps_loss unused
        parser.set_defaults(sup_loss="wce+dice", cps_loss="ce")
        parser.add_argument("--acisis_record", choices=("broadcast", "per_sample"), default="broadcast",
                            help="confidence metrics: every labeled sample's mask paired with every sample's "
                                 "probabilities as the original, or each sample with its own")

    def __init__(self, cfg):
        super().__init__(cfg)
        self.sup_loss = make_loss_function(cfg.sup_loss)  # no weights are ever passed: plain CE + Dice
        self.unsup_loss = WeightedCrossEntropyLoss()
        self.confs = ConfidenceArray(cfg.num_cls, momentum=0.99, broadcast=cfg.acisis_record == "broadcast")

    def on_train_start(self, labeled_ds):
        """One rate update per epoch: the epoch's iteration count (the labeled set repeats to the unlabeled)."""
        per_rank = math.ceil(len(labeled_ds) / world_size())  # torchrun: each rank's share of the cases
        self.confs.update_iter = math.ceil(per_rank / self.cfg.batch_size)

    def training_step(self, x_l, y_l, x_u, step):
        n_l = x_l.shape[0]
        logits = self.student(torch.cat([x_l, x_u]))
        logits_l, logits_u = logits[:n_l], logits[n_l:]
        with torch.no_grad():
            pseudo = self.teacher(x_u).argmax(1, keepdim=True)       # hard, no threshold
        loss_sup = self.sup_loss(logits_l, y_l)
        self.confs.record_data(logits_l.detach(), y_l)
        self.confs.cal_sampling_rate()                                # updates inside the epoch's last iteration
        weight_map = self.confs.cal_sampling_mask(logits_u.detach())
        loss_u = self.unsup_loss(logits_u, pseudo, weight_map)       # (acisis-6): mean over all unlabeled voxels
        return {"loss": loss_sup + step.unsup_w * loss_u, "sup": loss_sup, "cps": loss_u}  # (acisis-7)

    def on_epoch_end(self, epoch):
        return {"acisis/sampling_rate": self.confs.rate, "acisis/class_confidence": self.confs.cc}

    def state_dict(self):
        return {**super().state_dict(), "confidence_array": self.confs.state_dict()}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.confs.load_state_dict(state["confidence_array"])


if __name__ == "__main__":
    run(ACISIS)
