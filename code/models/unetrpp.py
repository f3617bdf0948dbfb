"""UNETR++ as the DHC repository trains it: a hybrid CNN-transformer 3-D segmentation network.

Paper: Shaker, Maaz, Rasheed, Khan, Yang, Khan, "UNETR++: Delving into Efficient and Accurate 3D Medical Image
Segmentation", IEEE TMI 2024, arXiv 2212.04497. Idea: efficient paired attention (EPA) — a channel-attention and a
spatial-attention branch sharing their query/key, with keys and values projected to P tokens so the spatial branch
is linear in the number of tokens.

This is the variant DHC's ``train_dhc_unetrpp.py`` builds (docs/methods.md#dhc_unetrpp), not the official one: the
two EPA branches are *summed* without output projections, one bias-free matrix ``EF`` [N, P] projects both keys
and values, the stem is a 4×4×4 convolution with stride 4, skips are *added* and there is no deep supervision.
State-dict keys and shapes equal the original's (485 keys at ``feature_size`` 32, so its checkpoints load with
``strict=True``), and so do the eval-mode outputs. Convolutions, residual blocks, norms and the output block are
MONAI's; the transformer block, EPA, encoder and up-block are written here.

The original fixes its token counts for a 64×128×128 patch; here ``patch_size`` is a parameter (every axis a
multiple of 32). Positional embeddings and ``EF`` have one row per token, so the state dict depends on the patch:
only the default patch loads the original's checkpoints.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.blocks.dynunet_block import UnetOutBlock, UnetResBlock, get_conv_layer
from monai.networks.layers.utils import get_norm_layer

from utils.device import at_least_fp32
from utils.io import ConfigError

PAPER_PATCH = (64, 128, 128)
STEM_STRIDE = 4          # stem: kernel 4, stride 4
PATCH_MULTIPLE = 32      # stem ×4, then three ×2 downsamplings whose outputs are added back as skips
ENCODER_PROJ = (64, 64, 64, 32)   # EPA projection size P per encoder stage
DECODER_PROJ = 64
DROPOUT = 0.1            # attention maps and Dropout3d in every transformer block


def check_patch(patch_size, feature_size=None):
    """``patch_size`` as a tuple of 3 ints, or ConfigError naming the patch and the constraint."""
    patch = tuple(int(s) for s in patch_size)
    if len(patch) != 3 or any(s <= 0 or s % PATCH_MULTIPLE for s in patch):
        raise ConfigError(f"UNETR_PP cannot take patch {patch}: every axis must be a positive multiple of "
                          f"{PATCH_MULTIPLE} (stride-4 stem, three stride-2 downsamplings, skips added), "
                          f"e.g. --patch_size 32 64 64")
    if feature_size is not None and feature_size % 2:
        raise ConfigError(f"UNETR_PP cannot take n_filters {feature_size}: it must be even (4 attention heads "
                          f"over 2·n_filters channels)")
    return patch


class EPA(nn.Module):
    """Efficient paired attention on tokens [B, N, C] (docs/methods.md#dhc_unetrpp, (epa-1)-(epa-3)).

    ``qkvv`` gives q, k, v_CA, v_SA (that order), each [B, h, dh, N]. Channel branch:
    softmax(q̂ k̂ᵀ · τ₁) v_CA with q̂, k̂ L2-normalised over the tokens. Spatial branch:
    softmax(q̂ᵀ (k·EF) · τ₂) (v_SA·EF)ᵀ with the *un-normalised* k, then permuted to [B, dh, h, N] and plainly
    reshaped to [B, N, C] (this mixes tokens and channels, as the original). The result is the sum of both.
    """

    def __init__(self, input_size, hidden_size, proj_size, num_heads=4, dropout=DROPOUT):
        super().__init__()
        self.num_heads = num_heads
        self.temperature = nn.Parameter(torch.ones(num_heads, 1, 1))
        self.temperature2 = nn.Parameter(torch.ones(num_heads, 1, 1))
        self.qkvv = nn.Linear(hidden_size, hidden_size * 4, bias=False)
        bound = 1 / math.sqrt(proj_size)
        self.EF = nn.Parameter(torch.empty(input_size, proj_size).uniform_(-bound, bound))
        self.attn_drop = nn.Dropout(dropout)
        self.attn_drop_2 = nn.Dropout(dropout)

    def forward(self, x):
        b, n, c = x.shape
        qkvv = self.qkvv(x).reshape(b, n, 4, self.num_heads, c // self.num_heads).permute(2, 0, 3, 4, 1)
        q, k, v_ca, v_sa = qkvv[0], qkvv[1], qkvv[2], qkvv[3]          # [B, h, dh, N] each
        k_proj, v_sa_proj = k @ self.EF, v_sa @ self.EF                  # [B, h, dh, P]
        # over the tokens; in fp32 as CUDA autocast runs norms (the matmuls below cast back to the autocast dtype)
        q, k = F.normalize(at_least_fp32(q), dim=-1), F.normalize(at_least_fp32(k), dim=-1)
        attn_ca = self.attn_drop(((q @ k.transpose(-2, -1)) * self.temperature).softmax(dim=-1))  # [B,h,dh,dh]
        x_ca = (attn_ca @ v_ca).permute(0, 3, 1, 2).reshape(b, n, c)
        attn_sa = self.attn_drop_2(((q.transpose(-2, -1) @ k_proj) * self.temperature2).softmax(dim=-1))
        x_sa = (attn_sa @ v_sa_proj.transpose(-2, -1)).permute(0, 3, 1, 2).reshape(b, n, c)  # [B,dh,h,N] -> [B,N,C]
        return x_ca + x_sa


class TransformerBlock(nn.Module):
    """Tokens + positional embedding, layer-scaled EPA residual, then a BatchNorm residual conv block and a
    Dropout3d + 1×1×1 conv, added back: ``y + conv8(conv51(y))`` on [B, C, D, H, W]."""

    def __init__(self, input_size, hidden_size, proj_size, num_heads=4, dropout=DROPOUT):
        super().__init__()
        self.norm = nn.LayerNorm(hidden_size)
        self.gamma = nn.Parameter(1e-6 * torch.ones(hidden_size))
        self.epa_block = EPA(input_size, hidden_size, proj_size, num_heads, dropout)
        self.conv51 = UnetResBlock(3, hidden_size, hidden_size, kernel_size=3, stride=1, norm_name="batch")
        self.conv8 = nn.Sequential(nn.Dropout3d(dropout), nn.Conv3d(hidden_size, hidden_size, 1))
        self.pos_embed = nn.Parameter(torch.zeros(1, input_size, hidden_size))

    def forward(self, x):
        b, c, d, h, w = x.shape
        t = x.reshape(b, c, d * h * w).permute(0, 2, 1) + self.pos_embed
        t = t + self.gamma * self.epa_block(self.norm(t))
        y = t.reshape(b, d, h, w, c).permute(0, 4, 1, 2, 3)
        return y + self.conv8(self.conv51(y))


def blocks(input_size, hidden_size, proj_size, depth=3):
    return nn.Sequential(*(TransformerBlock(input_size, hidden_size, proj_size) for _ in range(depth)))


class UnetrPPEncoder(nn.Module):
    """Stem (conv k4 s4 + GroupNorm(1)) and three downsamplings (conv k2 s2 + GroupNorm with groups = input
    width), each followed by a stage of transformer blocks; returns the four stage outputs."""

    def __init__(self, token_counts, dims, depths, in_channels=1):
        super().__init__()
        self.downsample_layers = nn.ModuleList()
        for i, (c_in, c_out) in enumerate(zip((in_channels, *dims[:-1]), dims)):
            kernel = STEM_STRIDE if i == 0 else 2
            self.downsample_layers.append(nn.Sequential(
                get_conv_layer(3, c_in, c_out, kernel_size=kernel, stride=kernel, conv_only=True),
                get_norm_layer(name=("group", {"num_groups": 1 if i == 0 else c_in}), channels=c_out)))
        self.stages = nn.ModuleList(blocks(n, c, p, depth)
                                    for n, c, p, depth in zip(token_counts, dims, ENCODER_PROJ, depths))
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m):
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)  # cut at ±2 (absolute), as timm's
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.LayerNorm):
            nn.init.constant_(m.weight, 1.0)
            nn.init.constant_(m.bias, 0)

    def forward(self, x):
        hidden = []
        for down, stage in zip(self.downsample_layers, self.stages):
            x = stage(down(x))
            hidden.append(x)
        return hidden


class UnetrUpBlock(nn.Module):
    """Transposed conv (bias-free) of the input, plus the skip, then three transformer blocks — or, for the
    last up-block (``out_size`` None), one instance-norm residual conv block."""

    def __init__(self, in_channels, out_channels, upsample, norm_name, out_size=None, proj_size=DECODER_PROJ):
        super().__init__()
        self.transp_conv = get_conv_layer(3, in_channels, out_channels, kernel_size=upsample, stride=upsample,
                                          conv_only=True, is_transposed=True)
        block = (UnetResBlock(3, out_channels, out_channels, kernel_size=3, stride=1, norm_name=norm_name)
                 if out_size is None else blocks(out_size, out_channels, proj_size))
        self.decoder_block = nn.ModuleList([block])

    def forward(self, x, skip):
        return self.decoder_block[0](self.transp_conv(x) + skip)


class UNETR_PP(nn.Module):  # noqa: N801 (the original's name, recorded in run.json)
    """The original's ``UNETR_PP(in_channels, out_channels, feature_size, hidden_size, dims)`` with 4 heads,
    depths [3, 3, 3, 3], instance norm and no deep supervision; ``patch_size`` (D, H, W) sizes the token
    counts (default the paper's 64×128×128). Returns raw logits [B, out_channels, D, H, W]."""

    def __init__(self, in_channels, out_channels, feature_size=32, hidden_size=None, dims=None,
                 depths=(3, 3, 3, 3), norm_name="instance", patch_size=PAPER_PATCH):
        super().__init__()
        self.patch_size = check_patch(patch_size, feature_size)
        dims = list(dims or [feature_size * m for m in (2, 4, 8, 16)])
        if dims != [feature_size * m for m in (2, 4, 8, 16)] or (hidden_size or dims[3]) != dims[3]:
            raise ConfigError(f"UNETR_PP: dims {dims} / hidden_size {hidden_size} must be feature_size·[2,4,8,16] "
                              f"/ feature_size·16 (skips are added)")
        grids = [tuple(s // (STEM_STRIDE * 2 ** i) for s in self.patch_size) for i in range(4)]
        tokens = [math.prod(g) for g in grids]
        self.unetr_pp_encoder = UnetrPPEncoder(tokens, dims, depths, in_channels)
        self.encoder1 = UnetResBlock(3, in_channels, feature_size, kernel_size=3, stride=1, norm_name=norm_name)
        self.decoder5 = UnetrUpBlock(dims[3], dims[2], 2, norm_name, out_size=tokens[2])
        self.decoder4 = UnetrUpBlock(dims[2], dims[1], 2, norm_name, out_size=tokens[1])
        self.decoder3 = UnetrUpBlock(dims[1], dims[0], 2, norm_name, out_size=tokens[0])
        self.decoder2 = UnetrUpBlock(dims[0], feature_size, STEM_STRIDE, norm_name)
        self.out1 = UnetOutBlock(3, feature_size, out_channels)

    @classmethod
    def from_registry(cls, n_channels, n_classes, n_filters, normalization="batchnorm", has_dropout=False,
                      patch_size=PAPER_PATCH):
        """``models.build_network`` form: the original's ``UNETR_PP(in_channels=1, out_channels=C,
        feature_size=F, hidden_size=16F, dims=[2F, 4F, 8F, 16F])``. Its norms are fixed (batch norm inside
        transformer blocks) and its dropout is always on in train mode, so ``has_dropout`` is ignored."""
        if normalization != "batchnorm":
            raise ConfigError(f"UNETR_PP: normalization {normalization!r} is not configurable (batchnorm only)")
        return cls(n_channels, n_classes, feature_size=n_filters, hidden_size=16 * n_filters,
                   dims=[m * n_filters for m in (2, 4, 8, 16)], patch_size=patch_size)

    def forward(self, x):
        if tuple(x.shape[2:]) != self.patch_size:
            raise ValueError(f"UNETR_PP built for patch {self.patch_size} got input {tuple(x.shape[2:])}")
        enc1, enc2, enc3, enc4 = self.unetr_pp_encoder(x)
        out = self.decoder3(self.decoder4(self.decoder5(enc4, enc3), enc2), enc1)
        return self.out1(self.decoder2(out, self.encoder1(x)))
