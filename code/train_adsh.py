"""Adsh: adaptive thresholding (Guo & Li, "Class-Imbalanced Semi-Supervised Learning with Adaptive Thresholding",
ICML 2022, PMLR 162), as DHC's baseline on two co-trained VNets (docs/methods.md#adsh).

Idea: one confidence threshold τ admits mostly majority-class pseudo-labels; keep τ for the majority class only and
give every other class the threshold that admits the same fraction ρ of its predictions, re-estimated from a bank
of recent unlabeled softmax maps (docs/methods.md#adsh, equations (adsh-1)-(adsh-5)). Here samples are voxels,
each net keeps its own bank, and the peer's per-class maps 1[p_c > thr_c] multiply the student's logits in the
cross CE. Faithful: τ = 0.9, bank of ⌊U/4⌋ patches (U unlabeled cases) refreshed when full, ranks over all
voxels, the unwritten last slot of an odd bank, maps on logits (``--adsh_mask voxel`` masks the loss instead).
Unlike the original, banks and thresholds are saved for resume.
"""
import torch

from cotraining import CoTraining, hard_labels
from engine import run
from utils.distributed import all_gather_cat
from utils.io import ConfigError
from utils.loss import WeightedCrossEntropyLoss

THRESH_MAJOR = 0.9  # what the training script passes (the class default is 0.95)


class ADSH:
    """Per-class thresholds of one net from a bank of ``tot_iter`` unlabeled softmax patches (``tot_iter`` is
    the bank size K). ``get_thresholds(out)`` stores ``softmax(out)`` while the bank is not full and otherwise
    re-estimates (adsh-1)-(adsh-3) from the bank, empties it (this batch is not stored) and returns the new values."""

    def __init__(self, num_cls, thresh_major=0.95, tot_iter=4, patch_size=(64, 128, 128), device=None):
        self.num_cls, self.thresh_major, self.tot_iter = num_cls, thresh_major, tot_iter
        self.scores = torch.zeros(tot_iter, num_cls, *patch_size, device=device)
        self.cur_iter = 0  # write pointer into the bank
        self.thresholds = torch.zeros(num_cls, device=device)  # 0 until the first estimate: every voxel passes

    def get_thresholds(self, out):
        """The current thresholds ``[C]`` (the same tensor, updated in place) after storing or estimating."""
        if self.scores.device != out.device:
            self.scores, self.thresholds = self.scores.to(out.device), self.thresholds.to(out.device)
        if self.cur_iter < self.tot_iter - 1:
            bsz = out.shape[0]
            self.scores[self.cur_iter:self.cur_iter + bsz] = torch.softmax(out.detach().float(), dim=1)
            self.cur_iter += bsz
        else:
            self.thresholds.copy_(estimate_thresholds(self.scores, self.thresh_major))
            self.cur_iter = 0
        return self.thresholds

    def state_dict(self):
        """Pointer, thresholds and the slots written in this cycle (the others are rewritten before the next
        estimate, or are the never-written zero slot of an odd bank)."""
        return {"tot_iter": self.tot_iter, "cur_iter": self.cur_iter, "thresholds": self.thresholds.clone(),
                "filled": self.scores[:self.cur_iter].clone()}

    def load_state_dict(self, state):
        self.__init__(self.num_cls, self.thresh_major, state["tot_iter"], self.scores.shape[2:],
                      state["thresholds"].device)
        self.cur_iter = state["cur_iter"]
        self.thresholds.copy_(state["thresholds"])
        self.scores[:self.cur_iter] = state["filled"]


def estimate_thresholds(scores, thresh_major):
    """(adsh-1)-(adsh-3) on a bank ``[K, C, ...]``: n_c = #voxels predicted c, k = argmax n, ρ = (#(P_k > τ) + 1e-8) /
    (n_k + 1e-8) in float32, thr_c = the ⌊ρ·n_c⌋-th (0-based) largest class-c probability over *all* bank voxels.
    A class never predicted gets its maximum probability. The rank is clamped to the last voxel (the original
    raises IndexError in that degenerate case)."""
    num_cls = scores.shape[1]
    counts = torch.bincount(scores.argmax(dim=1).flatten(), minlength=num_cls)
    major = counts.argmax()
    above = (scores[:, major] > thresh_major).sum()
    rho = (above + 1e-8) / (counts[major] + 1e-8)  # int64 + python float -> float32, as the original
    ranks = (rho * counts).long().clamp(max=scores[:, 0].numel() - 1)
    return torch.stack([scores[:, c].flatten().sort(descending=True).values[ranks[c]] for c in range(num_cls)])


def bank_thresholds(bank, out):
    """``bank.get_thresholds(out)``; under torchrun every rank's batch enters, in rank order, as consecutive batches,
    so all ranks hold the same bank and thresholds (those of one process seeing the batches one after another)."""
    for part in all_gather_cat(out).split(out.shape[0]):
        thresholds = bank.get_thresholds(part)
    return thresholds


def cal_sampling_mask(out, thresholds):
    """(adsh-4) per-class maps ``S[:, c] = 1[softmax(out)_c > thr_c]`` (strict), float, ``out``'s shape."""
    probs = torch.softmax(out.detach().float(), dim=1)
    return (probs > thresholds.to(out.device).view(1, -1, *[1] * (out.dim() - 2))).float()


class ADSHCoTraining(CoTraining):
    """Adsh on CPS: the peer's thresholded class maps gate the student's logits (docs/methods.md#adsh)."""
    name = "adsh"
    drop_last = True  # every batch is 2 + 2, so the bank fills in whole batches
    defaults = {"cps_w": 0.1, "cps_rampup": True}  # the original script's -w 0.1 and -r on

    @classmethod
    def add_args(cls, parser):
        parser.add_argument("--adsh_bank", type=int, default=None,
                            help="bank size K in patches (default ⌊U/4⌋ for U unlabeled cases, at least 1)")
        parser.add_argument("--adsh_mask", choices=("logits", "voxel"), default="logits",
                            help="'logits': CE(z ⊙ S_peer, ŷ_peer) as the original; 'voxel': mask each voxel's "
                                 "CE by whether the peer's class passes its threshold (Adsh's selection)")

    def __init__(self, cfg):
        super().__init__(cfg)
        if cfg.cps_loss != "wce":
            raise ConfigError(f"--cps_loss {cfg.cps_loss!r}: adsh supports only 'wce'")
        self.adsh = None  # per net, built in on_train_start (or from last.pth)
        self.masked_ce = WeightedCrossEntropyLoss()

    def make_banks(self, tot_iter):
        cfg = self.cfg
        return {k: ADSH(cfg.num_cls, THRESH_MAJOR, tot_iter, cfg.patch_size, cfg.device) for k in self.nets}

    def on_train_start(self, labeled_ds):
        """K = ⌊U/4⌋: the labeled set repeats to the unlabeled length, so ``len(labeled_ds)`` is U."""
        self.adsh = self.make_banks(self.cfg.adsh_bank or max(len(labeled_ds) // 4, 1))

    def training_step(self, x_l, y_l, x_u, step):
        logits = dict(zip(("A", "B"), self.forward_both(x_l, x_u)))
        n = x_l.shape[0]
        loss_sup = self.sup_losses["A"](logits["A"][:n], y_l) + self.sup_losses["B"](logits["B"][:n], y_l)
        targets = {k: hard_labels(z) for k, z in logits.items()}
        thresholds = {k: bank_thresholds(self.adsh[k], z[n:].detach()) for k, z in logits.items()}
        maps = {k: cal_sampling_mask(z, thresholds[k]) for k, z in logits.items()}
        loss_cps = self.cross_loss(logits["A"], targets["B"], maps["B"], "A") \
            + self.cross_loss(logits["B"], targets["A"], maps["A"], "B")
        return {"loss": loss_sup + step.unsup_w * loss_cps, "sup": loss_sup, "cps": loss_cps}

    def cross_loss(self, logits, target, peer_map, net):
        """(adsh-5): mean over all voxels of CE(z ⊙ S_peer, ŷ_peer), or with ``--adsh_mask voxel`` of
        S_peer[ŷ_peer]·CE(z, ŷ_peer)."""
        if self.cfg.adsh_mask == "logits":
            return self.cps_losses[net](logits * peer_map, target.unsqueeze(1))
        keep = peer_map.gather(1, target.unsqueeze(1)).squeeze(1)
        return self.masked_ce(logits, target, weight_map=keep)

    def on_epoch_end(self, epoch):
        """Each net's thresholds as they stand at the end of the epoch."""
        return {f"thresholds/{k}": a.thresholds for k, a in self.adsh.items()}

    def state_dict(self):
        return {**super().state_dict(), "adsh": {k: a.state_dict() for k, a in self.adsh.items()}}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.adsh = self.make_banks(1)
        for k, bank in self.adsh.items():
            bank.load_state_dict(state["adsh"][k])


if __name__ == "__main__":
    run(ADSHCoTraining)
