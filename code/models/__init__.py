"""Networks with the original's module names, so released checkpoints load with strict=True."""
from models.unet_ds import unet_3D_ds
from models.vnet import VNet
from models.vnet_dst import VNet_Decoupled
from models.vnet_ssnet import VNet4SSNet
from utils.io import ConfigError


def _unetr_pp(**kwargs):
    """UNETR++ (models/unetrpp.py), imported on use: it needs MONAI, which VNet users need not load."""
    from models.unetrpp import UNETR_PP
    return UNETR_PP.from_registry(**kwargs)


NETWORKS = {"VNet": VNet, "UNETR_PP": _unetr_pp}
PATCH_SIZED = {"UNETR_PP"}  # parameter shapes depend on the training patch (positional embeddings)
NETWORKS["unet_3D_ds"] = unet_3D_ds  # URPC
NETWORKS["VNet_Decoupled"] = VNet_Decoupled  # DST
NETWORKS["VNet4SSNet"] = VNet4SSNet  # SS-Net


def build_network(name, n_channels, n_classes, n_filters, normalization="batchnorm", has_dropout=False,
                  patch_size=None):
    """The network registered as ``name`` (``run.json``'s "network" record); unknown names raise ConfigError.
    ``patch_size`` (D, H, W) reaches only the networks in PATCH_SIZED (None: their default patch)."""
    if name not in NETWORKS:
        raise ConfigError(f"unknown network {name!r}; known networks: {', '.join(NETWORKS)}")
    extra = {"patch_size": tuple(patch_size)} if name in PATCH_SIZED and patch_size is not None else {}
    return NETWORKS[name](n_channels=n_channels, n_classes=n_classes, n_filters=n_filters,
                          normalization=normalization, has_dropout=has_dropout, **extra)
