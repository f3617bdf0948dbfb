"""DHC: Dual-debiased Heterogeneous Co-training (Wang & Li, MICCAI 2023, arXiv 2307.11960).

Two VNets trained by cross pseudo supervision; A is weighted by DiffDW (difficulty-aware), B by DistDW
(distribution-aware); each model's weights enter both its supervised and its CPS loss.
See docs/methods.md#dhc: (D1)-(D4), (F1)-(F8), (L1)-(L4), (E1)-(E3); Qn: docs/original-quirks.md.
Faithful on purpose: DistDW counts B's *own* unlabeled argmax (Q28); background weight of B is 0 (Q29);
DiffDW compares consecutive, different batches and starts from Dprev = ε (Q32); weights are ×C (Q33).
"""
import torch

from cotraining import CoTraining
from engine import run
from utils.distributed import all_reduce_sum
from utils.loss import hard_dice
from utils.ramps import ema

EPS = 1e-8


class DistDW:
    """Distribution-aware debiased weighting ((D1)-(D4)): rare classes get large weights; B's weights."""

    def __init__(self, num_cls, momentum=0.99):
        self.num_cls, self.momentum = num_cls, momentum
        self.weights = None  # length-C float32 tensor

    def _cal_weights(self, counts):
        """(D1)-(D2) ×C: C · log((max N + ε)/(N_c + ε)) / max_k log(...); all-equal counts give 0, not NaN (Q31)."""
        counts = counts.double()
        log_ratio = torch.log((counts.max() + EPS) / (counts + EPS))
        top = log_ratio.max()
        omega = torch.where(top > 0, log_ratio / torch.where(top > 0, top, torch.ones_like(top)),
                            torch.zeros_like(log_ratio))
        return (self.num_cls * omega).float()

    def init_weights(self, labels):
        """(D3) from the full stored labeled volumes (Q27): an iterable of label arrays, or the labeled dataset."""
        if hasattr(labels, "iter_stored_labels"):
            labels = labels.iter_stored_labels()
        counts = torch.zeros(self.num_cls, dtype=torch.float64)
        for label in labels:
            label = torch.as_tensor(label).long().flatten()
            counts += torch.bincount(label, minlength=self.num_cls)[: self.num_cls].double()
        self.weights = self._cal_weights(counts)
        return self.weights

    def get_ema_weights(self, logits):
        """(D4) from the argmax of ``logits`` [B, C, D, H, W] (detached), counted on the logits' device."""
        pseudo = logits.detach().argmax(1)
        counts = all_reduce_sum(torch.bincount(pseudo.flatten(), minlength=self.num_cls))  # over ranks (torchrun)
        self.weights = ema(self._cal_weights(counts), self.weights.to(logits.device), self.momentum)
        return self.weights

    def state_dict(self):
        return {"weights": self.weights}

    def load_state_dict(self, state):
        self.weights = state["weights"]


class DiffDW:
    """Difficulty-aware debiased weighting ((F1)-(F8)): classes being unlearned and with low Dice get large weights."""

    def __init__(self, num_cls, accumulate_iters=50):
        self.num_cls = num_cls
        self.beta = (accumulate_iters - 1) / accumulate_iters  # k = 50 -> β = 0.98 (Q9)
        self.dice_prev = self.learn = self.unlearn = self.one_minus_dice = None

    def init_weights(self):
        """State Dprev = ε, L = U = 0, M = 1; returns C·1 (never used: weights are recomputed before the loss)."""
        ones = torch.ones(self.num_cls)
        self.dice_prev, self.learn, self.unlearn, self.one_minus_dice = ones * EPS, ones * 0, ones * 0, ones.clone()
        return ones * self.num_cls

    def cal_weights(self, logits, label):
        """(F1)-(F8) from A's labeled logits [B, C, ...] (detached) and the ground truth [B, 1, ...] or [B, ...]."""
        dev = logits.device
        pred = logits.detach().argmax(1)
        dice = hard_dice(pred, label.reshape(pred.shape), self.num_cls, do_bg=True,  # (F1), batch dice
                         reduce=all_reduce_sum).float()  # torchrun: counts of every rank's batch
        prev = self.dice_prev.to(dev)
        delta, log_ratio = dice - prev, torch.log(dice / prev)                    # (F2)
        zero = torch.zeros_like(dice)
        learn = torch.where(delta > 0, delta * log_ratio, zero)                   # (F3)
        unlearn = torch.where(delta <= 0, delta * log_ratio, zero)
        self.dice_prev = dice                                                      # (F4)
        self.learn = ema(learn, self.learn.to(dev), self.beta)                     # (F5)
        self.unlearn = ema(unlearn, self.unlearn.to(dev), self.beta)
        difficulty = ((self.unlearn + EPS) / (self.learn + EPS)) ** (1 / 5)       # (F6)
        self.one_minus_dice = ema(1 - dice, self.one_minus_dice.to(dev), self.beta)  # (F7)
        weights = difficulty * self.one_minus_dice
        return self.num_cls * weights / weights.max()                              # (F8)

    def state_dict(self):
        return {"dice_prev": self.dice_prev, "learn": self.learn, "unlearn": self.unlearn,
                "one_minus_dice": self.one_minus_dice}

    def load_state_dict(self, state):
        for key, value in state.items():
            setattr(self, key, value)


class DHC(CoTraining):
    """DHC: CPS co-training of two VNets, A weighted by DiffDW and B by DistDW."""
    name = "dhc"
    defaults = {"base_lr": 3e-2, "cps_w": 0.1, "cps_rampup": True}  # README values (Q4, Q5)
    init_a = init_b = "kaiming"  # DHC re-initialises both nets with kaiming (CPS: xavier for B)

    def __init__(self, cfg):
        super().__init__(cfg)
        self.diff_dw = DiffDW(cfg.num_cls, accumulate_iters=50)
        self.dist_dw = DistDW(cfg.num_cls, momentum=0.99)
        self.w_a = self.w_b = None

    def on_train_start(self, labeled_ds):
        self.w_a = self.diff_dw.init_weights()
        self.w_b = self.dist_dw.init_weights(labeled_ds)

    def training_step(self, x_l, y_l, x_u, step):
        logits_a, logits_b, n = self.forward_both(x_l, x_u)                # labeled first
        self.w_a = self.diff_dw.cal_weights(logits_a[:n].detach(), y_l)   # step 5: A's labeled half vs GT
        self.w_b = self.dist_dw.get_ema_weights(logits_b[n:].detach())     # step 6: B's own unlabeled half
        loss_sup, loss_cps = self.cps_pair(logits_a, logits_b, y_l, n, self.w_a, self.w_b)  # (E1), (E2)
        return {"loss": loss_sup + step.unsup_w * loss_cps, "sup": loss_sup, "cps": loss_cps}  # (E3)

    def on_epoch_end(self, epoch):
        """The last iteration's class weights, and how many CE terms had all-zero target weights so far (Q30)."""
        return {"class_weights/A": self.w_a, "class_weights/B": self.w_b,
                "zero_weight_ce_terms": self.zero_weight_ce_terms()}

    def state_dict(self):
        return {**super().state_dict(), "diff_dw": self.diff_dw.state_dict(), "dist_dw": self.dist_dw.state_dict(),
                "w_a": self.w_a, "w_b": self.w_b}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.diff_dw.load_state_dict(state["diff_dw"])
        self.dist_dw.load_state_dict(state["dist_dw"])
        self.w_a, self.w_b = state["w_a"], state["w_b"]


if __name__ == "__main__":
    run(DHC)
