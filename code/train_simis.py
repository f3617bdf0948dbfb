"""SimiS as DHC ports it (Chen, Fan, Wang, Wang, Schiele, Xie, Savvides, Raj, "An Embarrassingly Simple Baseline
for Imbalanced Semi-Supervised Learning", arXiv 2211.11086, 2022).

SimiS tops up each class with pseudo-labeled samples in proportion to its gap to the most frequent class. DHC's
port turns that gap into per-class loss weights (docs/methods.md#simis):

    P_c = (N_c + ε) / (Σ_k N_k + ε),   w_c = C·(max_k P_k − P_c)

so the most frequent class gets 0. CPS co-training of two VNets (A kaiming, B xavier); each net's weights start with
one EMA step from C·1 towards the labeled-set weights and then follow an EMA (0.99) of the histogram of its own
argmax on the *whole* batch (labeled half included); they enter its weighted CE + Dice and its CE to the peer.
"""
import torch

from cotraining import ClassWeightedCoTraining
from engine import run
from train_dhc import DistDW
from utils.ramps import ema

EPS = 1e-8


class SimiS(DistDW):
    """SimiS class weights with DistDW's counting and EMA (same ``init_weights`` / ``get_ema_weights``).

    ``init_weights(labels)`` -> ``[C]`` = ``m·C + (1 − m)·W(labeled voxel counts)``; ``get_ema_weights(logits)`` ->
    ``m·w + (1 − m)·W(histogram of argmax logits)`` on the logits' device. ``do_bg`` is stored and unused, as in
    the original (whose class default momentum 0.95 is kept; the method passes 0.99).
    """

    def __init__(self, num_cls, do_bg=False, momentum=0.95):
        super().__init__(num_cls, momentum=momentum)
        self.do_bg = do_bg

    def _cal_weights(self, counts):
        """W(N) = C·(max P − P): the gap of each class's predicted share to the largest share."""
        counts = counts.double()
        share = (counts + EPS) / (counts.sum() + EPS)
        return (self.num_cls * (share.max() - share)).float()

    def init_weights(self, labels):
        labeled = super().init_weights(labels)
        self.weights = ema(labeled, torch.full_like(labeled, float(self.num_cls)), self.momentum)
        return self.weights


class SimiSCoTraining(ClassWeightedCoTraining):
    """SimiS-weighted CPS, each net from its own argmax over the whole batch (docs/methods.md#simis)."""
    name = "simis"
    defaults = {"base_lr": 1e-3, "cps_w": 0.1, "cps_rampup": False}  # the original's argparse defaults
    weighting_cls = SimiS
    count_labeled = True  # the histogram covers labeled and unlabeled volumes


if __name__ == "__main__":
    run(SimiSCoTraining)
