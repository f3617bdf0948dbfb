"""VNet of the original repository (docs/pipeline.md#vnet).

Module names, Sequential indices and construction order follow the original exactly, so the authors'
``best_model.pth`` loads with ``strict=True`` and a seeded construction draws the same default init:
205 state-dict keys, 37,778,126 parameters for (n_classes=14, n_filters=32), 37,778,192 for 16 classes.
"""
import torch.nn as nn

NORMALIZATIONS = ("batchnorm", "groupnorm", "instancenorm", "none")

# Stage name, ConvBlock depth and width (in units of n_filters), encoder then decoder (the layout in
# docs/pipeline.md#vnet).
_STAGES = (("one", 1, 1), ("two", 2, 2), ("three", 3, 4), ("four", 3, 8), ("five", 3, 16),
           ("six", 3, 8), ("seven", 3, 4), ("eight", 2, 2), ("nine", 1, 1))


def _conv_norm_relu(conv, channels, normalization):
    """[conv, norm, ReLU]; 'none' has no norm layer, so later Sequential indices shift as in the original."""
    if normalization == "batchnorm":
        norm = [nn.BatchNorm3d(channels)]
    elif normalization == "groupnorm":
        norm = [nn.GroupNorm(num_groups=16, num_channels=channels)]
    elif normalization == "instancenorm":
        norm = [nn.InstanceNorm3d(channels)]  # affine=False, no running stats: no state-dict keys
    elif normalization == "none":
        norm = []
    else:
        raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
    return [conv, *norm, nn.ReLU(inplace=True)]


class ConvBlock(nn.Module):
    """``n_stages`` × [Conv3d k3 p1, norm, ReLU], a plain stack (no residual): keys ``conv.{3s}``, ``conv.{3s+1}``."""

    def __init__(self, n_stages, n_filters_in, n_filters_out, normalization="none"):
        super().__init__()
        layers = []
        for s in range(n_stages):
            conv = nn.Conv3d(n_filters_in if s == 0 else n_filters_out, n_filters_out, 3, padding=1)
            layers += _conv_norm_relu(conv, n_filters_out, normalization)
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        return self.conv(x)


class DownsamplingConvBlock(nn.Module):
    """Conv3d k2 s2 p0 → norm → ReLU (halves every spatial size)."""

    def __init__(self, n_filters_in, n_filters_out, stride=2, normalization="none"):
        super().__init__()
        conv = nn.Conv3d(n_filters_in, n_filters_out, stride, padding=0, stride=stride)
        self.conv = nn.Sequential(*_conv_norm_relu(conv, n_filters_out, normalization))

    def forward(self, x):
        return self.conv(x)


class UpsamplingDeconvBlock(nn.Module):
    """ConvTranspose3d k2 s2 p0 (weight [in, out, 2, 2, 2]) → norm → ReLU (doubles every spatial size)."""

    def __init__(self, n_filters_in, n_filters_out, stride=2, normalization="none"):
        super().__init__()
        conv = nn.ConvTranspose3d(n_filters_in, n_filters_out, stride, padding=0, stride=stride)
        self.conv = nn.Sequential(*_conv_norm_relu(conv, n_filters_out, normalization))

    def forward(self, x):
        return self.conv(x)


class VNet(nn.Module):
    """VNet with additive skips; ``forward(image [B, n_channels, D, H, W]) -> logits [B, n_classes, D, H, W]``.

    D, H, W must be divisible by 16. With ``has_dropout`` one Dropout3d(0.5) (module ``dropout``, no keys) acts
    on the ``block_five`` and ``block_nine`` outputs in train mode; ``turnoff_drop=True`` skips it for one call.
    """

    def __init__(self, n_channels=1, n_classes=2, n_filters=16, normalization="batchnorm", has_dropout=False):
        super().__init__()
        self.has_dropout = has_dropout
        # Registration order = the original's (block_one, block_one_dw, …, block_five, block_five_up, block_six,
        # …, block_nine, out_conv), which fixes both the state-dict order and the seeded default-init draws.
        for i, (name, n_stages, width) in enumerate(_STAGES):
            ch = width * n_filters
            setattr(self, f"block_{name}", ConvBlock(n_stages, n_channels if i == 0 else ch, ch, normalization))
            if i < 4:
                setattr(self, f"block_{name}_dw", DownsamplingConvBlock(ch, 2 * ch, normalization=normalization))
            elif i < 8:
                setattr(self, f"block_{name}_up", UpsamplingDeconvBlock(ch, ch // 2, normalization=normalization))
        self.out_conv = nn.Conv3d(n_filters, n_classes, 1, padding=0)
        self.dropout = nn.Dropout3d(p=0.5, inplace=False)

    def forward(self, image, turnoff_drop=False):
        return self.out_conv(self.features(image, turnoff_drop))

    def features(self, image, turnoff_drop=False):
        """The ``block_nine`` output after dropout, [B, n_filters, D, H, W]: what ``out_conv`` classifies."""
        drop = self.has_dropout and not turnoff_drop
        names = [name for name, _, _ in _STAGES]
        skips, x = [], image
        for name in names[:4]:  # x1..x4 kept for the additive skips
            x = getattr(self, f"block_{name}")(x)
            skips.append(x)
            x = getattr(self, f"block_{name}_dw")(x)
        x = self.block_five(x)
        if drop:
            x = self.dropout(x)
        for prev, name, skip in zip(names[4:8], names[5:], reversed(skips)):
            x = getattr(self, f"block_{name}")(getattr(self, f"block_{prev}_up")(x) + skip)
        if drop:
            x = self.dropout(x)
        return x
