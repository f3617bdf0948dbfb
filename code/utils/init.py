"""Weight initialisation of the original's training scripts (docs/pipeline.md#initialisation,
docs/methods.md; Q38 in docs/original-quirks.md).

Only ``nn.Conv3d`` weights are re-drawn and ``nn.BatchNorm3d`` reset to weight 1 / bias 0. Conv biases keep the
PyTorch default, and ``nn.ConvTranspose3d`` is not a ``Conv3d`` subclass, so the up-convolutions keep their
default init too (Q38, kept on purpose). Modules are visited in registration order, like the original, so a
seeded run draws the same numbers.
"""
import torch
import torch.nn as nn


def _init_conv3d_bn3d(model, conv_init):
    for m in model.modules():
        if isinstance(m, nn.Conv3d):
            conv_init(m.weight)
        elif isinstance(m, nn.BatchNorm3d):
            with torch.no_grad():
                m.weight.fill_(1)
                m.bias.zero_()
    return model


def kaiming_normal_init_weight(model):
    """Conv3d weights ~ N(0, 2/fan_in) (``kaiming_normal_`` defaults); BN3d 1/0. Returns ``model``."""
    return _init_conv3d_bn3d(model, nn.init.kaiming_normal_)


def xavier_normal_init_weight(model):
    """Conv3d weights ~ N(0, 2/(fan_in+fan_out)) (``xavier_normal_``, gain 1); BN3d 1/0. Returns ``model``."""
    return _init_conv3d_bn3d(model, nn.init.xavier_normal_)
