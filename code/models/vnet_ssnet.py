"""VNet4SSNet: the VNet of SS-Net (Wu et al., MICCAI 2022) with the heads of its class-wise contrastive loss.

Backbone = ``models.vnet.VNet`` (same 205 keys). Heads, in the original's registration order (state-dict order and
seeded default-init draws), all ``nn.Sequential`` with PyTorch default init, feature width 2F:
``projection_head`` Linear(F, 2F)-BN1d-ReLU-Linear(2F, 2F), ``prediction_head`` Linear(2F, 2F)-BN1d-ReLU-
Linear(2F, 2F), then for every class ``contrastive_class_selector_{c}`` and afterwards every
``contrastive_class_selector_memory{c}`` (no underscore before c, as the original), each Linear(2F, 2F)-BN1d-
LeakyReLU(0.2)-Linear(2F, 1). 475 keys and 37,914,858 parameters at (C=14, F=32). See docs/methods.md#ssnet.
"""
import torch.nn as nn

from models.vnet import VNet


def _mlp(dim_in, dim_hidden, dim_out, act):
    return nn.Sequential(nn.Linear(dim_in, dim_hidden), nn.BatchNorm1d(dim_hidden), act,
                         nn.Linear(dim_hidden, dim_out))


class VNet4SSNet(VNet):
    """``forward(image)``: train mode -> ``(logits, embedding)`` with the ``block_nine`` output after dropout
    [B, F, D, H, W] as the embedding; eval mode -> ``logits`` only (what validation and test.py use)."""

    def __init__(self, n_channels=1, n_classes=2, n_filters=16, normalization="batchnorm", has_dropout=False):
        super().__init__(n_channels, n_classes, n_filters, normalization, has_dropout)
        feat = 2 * n_filters
        self.projection_head = _mlp(n_filters, feat, feat, nn.ReLU(inplace=True))
        self.prediction_head = _mlp(feat, feat, feat, nn.ReLU(inplace=True))
        for prefix in ("contrastive_class_selector_", "contrastive_class_selector_memory"):
            for c in range(n_classes):
                setattr(self, f"{prefix}{c}", _mlp(feat, feat, 1, nn.LeakyReLU(negative_slope=0.2, inplace=True)))

    def forward(self, image, turnoff_drop=False):
        embedding = self.features(image, turnoff_drop)
        logits = self.out_conv(embedding)
        return (logits, embedding) if self.training else logits
