"""CLS: an ablation of DHC with distribution-aware weighting (DistDW) on *both* nets. No paper of its own; it comes
with DHC (Wang & Li, "DHC: Dual-debiased Heterogeneous Co-training Framework for Class-imbalanced Semi-supervised
Medical Image Segmentation", MICCAI 2023, arXiv 2307.11960).

CPS co-training of two VNets (A kaiming, B xavier) in which each net weights the classes by
``C·log(N_max/N_c) / max_k log(N_max/N_k)`` of the histogram of its own argmax on the unlabeled half, EMA 0.99,
initialised from the labeled set; a net's weights enter its supervised CE + Dice and its CE to the peer's argmax
(docs/methods.md#cls, equations as DistDW in docs/methods.md#dhc). The original script cannot run as published;
this is the DHC loop with ``DistDW`` on both branches, which is what it describes.
"""
from cotraining import ClassWeightedCoTraining
from engine import run
from train_dhc import DistDW


class CLS(DistDW):
    """The original's ``CLS`` weighting: exactly DHC's DistDW (weights ×C, majority class 0, an absent class C).

    ``init_weights(labels)``: labels = iterable of label arrays or the labeled dataset -> ``[C]`` (no EMA step at
    init). ``get_ema_weights(logits)``: ``w ← m·w + (1 − m)·f(histogram of argmax logits)`` -> ``[C]`` on the
    logits' device. ``do_bg`` is stored and unused, as in the original.
    """

    def __init__(self, num_cls, do_bg=False, momentum=0.95):  # the original's signature; the method passes 0.99
        super().__init__(num_cls, momentum=momentum)
        self.do_bg = do_bg


class CLSCoTraining(ClassWeightedCoTraining):
    """DistDW-weighted CPS on both nets, each from its own unlabeled-half argmax (docs/methods.md#cls)."""
    name = "cls"
    defaults = {"base_lr": 1e-3, "cps_w": 0.1, "cps_rampup": True}  # the original's argparse defaults
    weighting_cls = CLS


if __name__ == "__main__":
    run(CLSCoTraining)
