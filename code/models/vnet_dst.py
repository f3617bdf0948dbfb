"""Decoupled VNet of the DST baseline (``VNet_Decoupled``; docs/methods.md#dst).

One VNet encoder with the VNet's module names (``block_one`` … ``block_five``) and three complete VNet decoders,
``decoder`` (main), ``decoder_pseudo`` and ``decoder_worst``, whose 1×1×1 classifier is named ``head``. State-dict
keys and shapes are the original's, so its checkpoints load with ``strict=True``: 391 keys (112 encoder + 3 × 93
decoder), 54,343,786 parameters for (n_classes=14, n_filters=32). The worst decoder sees every skip feature
through a warm-start gradient-reversal layer (docs/methods.md#dst, GRL coefficient).
"""
import math

import torch
import torch.nn as nn

from models.vnet import _STAGES, ConvBlock, DownsamplingConvBlock, UpsamplingDeconvBlock


class _ReverseGradient(torch.autograd.Function):
    """Identity forward; backward multiplies the incoming gradient by ``-coeff``."""

    @staticmethod
    def forward(ctx, x, coeff):
        ctx.coeff = coeff
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.neg() * ctx.coeff, None


class WarmStartGradientReverseLayer(nn.Module):
    """Gradient reversal whose strength warms up with the iteration count ``iter_num`` (Ganin & Lempitsky's
    schedule, as in DST): ``coeff(i) = 2(hi − lo) / (1 + exp(−α·i / max_iters)) − (hi − lo) + lo``, from ``lo`` at
    i = 0 towards ``hi``. ``step()`` advances i (every forward when ``auto_step``). ``iter_num`` is a plain
    attribute, not a state-dict entry (the original's checkpoint layout); a method saves it for resume."""

    def __init__(self, alpha=1.0, lo=0.0, hi=0.1, max_iters=500, auto_step=False):
        super().__init__()
        self.alpha, self.lo, self.hi, self.max_iters, self.auto_step = alpha, lo, hi, max_iters, auto_step
        self.iter_num = 0

    def coeff(self):
        span = self.hi - self.lo  # Python floats: the original's np.float is gone from numpy >= 1.24
        return float(2.0 * span / (1.0 + math.exp(-self.alpha * self.iter_num / self.max_iters)) - span + self.lo)

    def forward(self, x):
        coeff = self.coeff()
        if self.auto_step:
            self.step()
        return _ReverseGradient.apply(x, coeff)

    def step(self):
        self.iter_num += 1


class DecoupledDecoder(nn.Module):
    """A VNet decoder (``block_five_up`` … ``block_nine``, VNet's names and shapes) with classifier ``head``.

    ``forward([x1, …, x5], reverse=False)``: additive skips as VNet; with ``reverse`` every feature first passes
    ``grl_layer``. Its own Dropout3d(0.5) acts on the last feature map when ``has_dropout``."""

    def __init__(self, n_classes, n_filters, normalization, has_dropout):
        super().__init__()
        self.has_dropout = has_dropout
        for (deeper, _, width), (name, n_stages, out_width) in zip(_STAGES[4:8], _STAGES[5:]):
            setattr(self, f"block_{deeper}_up", UpsamplingDeconvBlock(width * n_filters, out_width * n_filters,
                                                                        normalization=normalization))
            setattr(self, f"block_{name}", ConvBlock(n_stages, out_width * n_filters, out_width * n_filters,
                                                     normalization))
        self.head = nn.Conv3d(n_filters, n_classes, 1, padding=0)
        self.grl_layer = WarmStartGradientReverseLayer(alpha=1.0, lo=0.0, hi=0.1, max_iters=500, auto_step=False)
        self.dropout = nn.Dropout3d(p=0.5, inplace=False)

    def forward(self, features, reverse=False, drop=True):
        if reverse:
            features = [self.grl_layer(f) for f in features]
        *skips, x = features
        for (deeper, _, _), (name, _, _), skip in zip(_STAGES[4:8], _STAGES[5:], reversed(skips)):
            x = getattr(self, f"block_{name}")(getattr(self, f"block_{deeper}_up")(x) + skip)
        if self.has_dropout and drop:
            x = self.dropout(x)
        return self.head(x)


class VNet_Decoupled(nn.Module):  # noqa: N801 (the original's class name: run.json and test.py use it)
    """Shared VNet encoder + main / pseudo / worst decoders.

    ``forward(image [B, n_channels, D, H, W])`` (sizes divisible by 16): train mode returns the logits
    ``(main, pseudo, worst)``, each ``[B, n_classes, D, H, W]``; eval mode returns ``main`` only. With
    ``has_dropout`` one Dropout3d(0.5) on the deepest feature is shared by the three decoders, and each decoder
    drops its own last feature map; ``turnoff_drop=True`` skips both for one call. ``step()`` advances the worst
    decoder's gradient-reversal counter (the other decoders own an unused one, as the original)."""

    def __init__(self, n_channels=1, n_classes=2, n_filters=16, normalization="batchnorm", has_dropout=False):
        super().__init__()
        self.has_dropout = has_dropout
        for i, (name, n_stages, width) in enumerate(_STAGES[:5]):  # VNet's encoder names, shapes and order
            ch = width * n_filters
            setattr(self, f"block_{name}", ConvBlock(n_stages, n_channels if i == 0 else ch, ch, normalization))
            if i < 4:
                setattr(self, f"block_{name}_dw", DownsamplingConvBlock(ch, 2 * ch, normalization=normalization))
        self.dropout = nn.Dropout3d(p=0.5, inplace=False)
        for name in ("decoder", "decoder_pseudo", "decoder_worst"):
            setattr(self, name, DecoupledDecoder(n_classes, n_filters, normalization, has_dropout))

    def encode(self, image, drop=True):
        """Skip features x1..x5 (x5 through the shared dropout when ``has_dropout`` and ``drop``)."""
        features, x = [], image
        for name, _, _ in _STAGES[:4]:
            x = getattr(self, f"block_{name}")(x)
            features.append(x)
            x = getattr(self, f"block_{name}_dw")(x)
        x = self.block_five(x)
        features.append(self.dropout(x) if self.has_dropout and drop else x)
        return features

    def forward(self, image, turnoff_drop=False):
        drop = not turnoff_drop
        features = self.encode(image, drop)
        out = self.decoder(features, drop=drop)
        if not self.training:
            return out
        return (out, self.decoder_pseudo(features, drop=drop),
                self.decoder_worst(features, reverse=True, drop=drop))

    def step(self):
        """One training iteration done: advance the worst decoder's gradient-reversal warm-up."""
        self.decoder_worst.grl_layer.step()
