"""Deeply supervised 3D U-Net of the URPC baseline (``unet_3D_ds``; docs/methods.md#urpc).

Module names, Sequential indices and registration order follow the original, so its checkpoints load with
``strict=True``: 44 state-dict keys (convolutions only: the norm is InstanceNorm3d without affine parameters or
running statistics), 5,887,432 parameters for 14 classes and 5,887,920 for 16 at the paper width.

Width: the original is ``unet_3D_ds(feature_scale=4)``, filters ``[64, 128, 256, 512, 1024] / feature_scale``.
Here ``n_filters`` is the first filter count and the filters are ``n_filters · [1, 2, 4, 8, 16]`` (so
``feature_scale = 64 / n_filters``): ``n_filters=16`` is the original's ``[16, 32, 64, 128, 256]``, smaller values
give a proportionally smaller net for CPU tests.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

NORMALIZATIONS = ("batchnorm", "instancenorm", "none")


class UnetConv3(nn.Module):
    """2 × [Conv3d k3 p1, InstanceNorm3d (no affine), ReLU] as ``conv1``, ``conv2`` (keys ``conv{1,2}.0.*``).

    ``norm=False`` drops the InstanceNorm (the original's ``is_batchnorm=False``). As the original, the constructor
    ends by redrawing both conv weights kaiming-normal (fan_in): the first of the two redraws of ``unet_3D_ds``."""

    def __init__(self, in_size, out_size, norm=True):
        super().__init__()
        for i, cin in ((1, in_size), (2, out_size)):
            layers = [nn.Conv3d(cin, out_size, 3, 1, 1)]
            layers += [nn.InstanceNorm3d(out_size)] if norm else []
            setattr(self, f"conv{i}", nn.Sequential(*layers, nn.ReLU(inplace=True)))
        for block in (self.conv1, self.conv2):
            nn.init.kaiming_normal_(block[0].weight, a=0, mode="fan_in")

    def forward(self, x):
        return self.conv2(self.conv1(x))


class UnetUp3_CT(nn.Module):
    """Trilinear ×2 upsampling of the deeper map, concatenated after the skip, then UnetConv3(in + out → out)."""

    def __init__(self, in_size, out_size, norm=True):
        super().__init__()
        self.conv = UnetConv3(in_size + out_size, out_size, norm)
        self.up = nn.Upsample(scale_factor=2, mode="trilinear")  # align_corners False, as the original

    def forward(self, skip, deep):
        up = self.up(deep)
        offset = up.shape[2] - skip.shape[2]  # 0 whenever the input sizes are divisible by 16
        if offset:  # the original's pad list 2 · [o//2, o//2, 0] (last axis first), kept as is
            skip = F.pad(skip, 2 * [offset // 2, offset // 2, 0])
        return self.conv(torch.cat([skip, up], 1))


class UnetDsv3(nn.Module):
    """Deep-supervision head: Conv3d k1 to the classes, then trilinear upsampling to the input size."""

    def __init__(self, in_size, out_size, scale_factor):
        super().__init__()
        self.dsv = nn.Sequential(nn.Conv3d(in_size, out_size, 1, 1, 0),
                                 nn.Upsample(scale_factor=scale_factor, mode="trilinear"))

    def forward(self, x):
        return self.dsv(x)


class unet_3D_ds(nn.Module):  # noqa: N801 (the original's class name: run.json and test.py use it)
    """3D U-Net with four deep-supervision heads at full resolution.

    ``forward(x [B, n_channels, D, H, W])`` (D, H, W divisible by 16): train mode returns the logits
    ``(dsv1, dsv2, dsv3, dsv4)``, each ``[B, n_classes, D, H, W]`` (dsv1 from the finest decoder level); eval mode
    returns ``dsv1`` alone. Dropout3d 0.5 / 0.3 / 0.2 / 0.1 after the four decoder levels are modules, so
    ``eval()`` turns them off; ``has_dropout=False`` skips them in train mode too.

    ``normalization``: "batchnorm" (what ``build_network`` passes and what the original's ``is_batchnorm=True``
    means) and "instancenorm" both give InstanceNorm3d without affine; "none" gives conv + ReLU.

    Initialisation in the original's draw order, so that a seed gives its weights and leaves the CPU random stream
    where it leaves it (docs/methods.md#urpc): each Conv3d draws PyTorch's default init when it is built, every
    ``UnetConv3`` redraws its two weights kaiming-normal (fan_in, a = 0) at the end of its constructor, and at the
    end of this constructor every Conv3d weight is redrawn kaiming-normal once more, in registration order. Biases
    keep PyTorch's default.
    """

    def __init__(self, n_channels=1, n_classes=2, n_filters=16, normalization="batchnorm", has_dropout=True):
        super().__init__()
        if normalization not in NORMALIZATIONS:
            raise ValueError(f"unet_3D_ds normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
        self.normalization, self.has_dropout = normalization, has_dropout
        norm = normalization != "none"
        f = [n_filters * 2 ** k for k in range(5)]
        # registration order = the original's: encoder, decoder, heads, dropouts
        self.conv1 = UnetConv3(n_channels, f[0], norm)
        self.maxpool1 = nn.MaxPool3d(2)
        self.conv2 = UnetConv3(f[0], f[1], norm)
        self.maxpool2 = nn.MaxPool3d(2)
        self.conv3 = UnetConv3(f[1], f[2], norm)
        self.maxpool3 = nn.MaxPool3d(2)
        self.conv4 = UnetConv3(f[2], f[3], norm)
        self.maxpool4 = nn.MaxPool3d(2)
        self.center = UnetConv3(f[3], f[4], norm)
        for k in (4, 3, 2, 1):
            setattr(self, f"up_concat{k}", UnetUp3_CT(f[k], f[k - 1], norm))
        for k in (4, 3, 2):
            setattr(self, f"dsv{k}", UnetDsv3(f[k - 1], n_classes, scale_factor=2 ** (k - 1)))
        self.dsv1 = nn.Conv3d(f[0], n_classes, 1)
        for i, p in enumerate((0.5, 0.3, 0.2, 0.1), start=1):
            setattr(self, f"dropout{i}", nn.Dropout3d(p=p))
        for m in self.modules():  # the second redraw, over the whole net
            if isinstance(m, nn.Conv3d):
                nn.init.kaiming_normal_(m.weight, a=0, mode="fan_in")

    def forward(self, x):
        conv1 = self.conv1(x)
        conv2 = self.conv2(self.maxpool1(conv1))
        conv3 = self.conv3(self.maxpool2(conv2))
        conv4 = self.conv4(self.maxpool3(conv3))
        deep = self.center(self.maxpool4(conv4))
        levels = []
        for k, skip in zip((4, 3, 2, 1), (conv4, conv3, conv2, conv1)):
            deep = getattr(self, f"up_concat{k}")(skip, deep)
            if self.has_dropout:
                deep = getattr(self, f"dropout{5 - k}")(deep)
            levels.append(deep)
        up4, up3, up2, up1 = levels
        dsv1 = self.dsv1(up1)
        if not self.training:
            return dsv1
        return dsv1, self.dsv2(up2), self.dsv3(up3), self.dsv4(up4)
