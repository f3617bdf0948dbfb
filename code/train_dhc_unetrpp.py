"""DHC with a UNETR++ backbone: Dual-debiased Heterogeneous Co-training (Wang & Li, MICCAI 2023, arXiv
2307.11960) on two UNETR++ networks (Shaker et al., IEEE TMI 2024, arXiv 2212.04497).

Idea: DHC unchanged — CPS co-training with A weighted by DiffDW and B by DistDW (docs/methods.md#dhc) — with the
two VNets replaced by two transformer-CNN UNETR++ nets (docs/methods.md#dhc_unetrpp, models/unetrpp.py).
As the original's ``train_dhc_unetrpp.py``: no flips (``--flip`` turns them on), both nets re-initialised with
kaiming on their Conv3d weights (the transposed convolutions, Linears, positional embeddings and EF keep the
network's own init), patch 64×128×128 on the real tasks. The patch must have every axis a multiple of 32 (the
phantom's default 16×48×48 does not: pass e.g. ``--patch_size 32 64 64``).
"""
import argparse

from engine import run
from train_dhc import DHC


class DHCUnetrPP(DHC):
    """DHC (weights, losses, step and state from ``train_dhc.DHC``) on two UNETR++ nets, trained without flips."""
    name = "dhc_unetrpp"
    network = "UNETR_PP"
    defaults = {**DHC.defaults, "no_flip": True}  # the original comments its flips out
    init_a = init_b = "kaiming"

    @classmethod
    def add_args(cls, parser):
        super().add_args(parser)
        parser.set_defaults(no_flip=cls.defaults["no_flip"])  # the shared --no_flip is a plain store_true
        parser.add_argument("--flip", dest="no_flip", action="store_false", default=argparse.SUPPRESS,
                            help="train with HEAD's random flips (the original's UNETR++ script has none)")


if __name__ == "__main__":
    run(DHCUnetrPP)
