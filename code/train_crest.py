"""CReST as DHC ports it (Wei, Sohn, Mellina, Yuille, Yang, "CReST: A Class-Rebalancing Self-Training Framework
for Imbalanced Semi-Supervised Learning", CVPR 2021, arXiv 2102.09559).

CReST re-samples pseudo-labeled data at rates reversed from the class frequencies. DHC's port has no generations and
no sampling: the reversed rates become per-class loss weights (docs/methods.md#crest, eq. (1) there),

    μ_c = ((N_c + ε) / (max_k N_k + ε))^(1/3),   w_σ(l) = μ_σ(C−1−l)

with σ the classes in descending μ order (a stable sort: ties keep index order), background included, so the most
frequent class gets the rarest class's μ and the rarest class gets 1. CPS co-training of two VNets (A kaiming,
B xavier); each net's weights start from the labeled-set counts and follow an EMA (0.99) of the histogram of its
own argmax on the unlabeled half; they enter its weighted CE + Dice and its weighted CE to the peer's argmax.
"""
import torch

from cotraining import ClassWeightedCoTraining
from engine import run
from train_dhc import DistDW

EPS = 1e-8


class CReST(DistDW):
    """CReST class weights with DistDW's counting and EMA (same ``init_weights`` / ``get_ema_weights``).

    ``init_weights(labels)`` -> ``[C]`` = W(labeled voxel counts); ``get_ema_weights(logits)`` ->
    ``m·w + (1 − m)·W(histogram of argmax logits)`` on the logits' device. ``do_bg`` is stored and unused (the
    background is always weighted), as in the original.
    """

    def __init__(self, num_cls, do_bg=False, momentum=0.99):
        super().__init__(num_cls, momentum=momentum)
        self.do_bg = do_bg

    def _cal_weights(self, counts):
        """W(N): the μ vector permuted so that the l-th most frequent class takes the l-th rarest class's μ."""
        counts = counts.double()
        mu = ((counts + EPS) / (counts.max() + EPS)) ** (1 / 3)
        order = torch.sort(mu, descending=True, stable=True).indices
        weights = torch.empty_like(mu)
        weights[order] = mu[order.flip(0)]
        return weights.float()


class CReSTCoTraining(ClassWeightedCoTraining):
    """CReST-weighted CPS (docs/methods.md#crest): each net re-weights the classes every iteration from the
    histogram of its own argmax on the unlabeled half, the most frequent class taking the rarest class's rate."""
    name = "crest"
    defaults = {"base_lr": 1e-3, "cps_w": 0.1, "cps_rampup": False}  # the original's argparse defaults
    weighting_cls = CReST


if __name__ == "__main__":
    run(CReSTCoTraining)
