"""Networks with the original's module names, so released checkpoints load with strict=True."""
from models.unet_ds import unet_3D_ds
from models.vnet import VNet
from models.vnet_dst import VNet_Decoupled
from models.vnet_ssnet import VNet4SSNet
from utils.io import ConfigError

NETWORKS = {"VNet": VNet}
NETWORKS["unet_3D_ds"] = unet_3D_ds  # URPC
NETWORKS["VNet_Decoupled"] = VNet_Decoupled  # DST
NETWORKS["VNet4SSNet"] = VNet4SSNet  # SS-Net


def build_network(name, n_channels, n_classes, n_filters, normalization="batchnorm", has_dropout=False):
    """The network registered as ``name`` (``run.json``'s "network" record); unknown names raise ConfigError."""
    if name not in NETWORKS:
        raise ConfigError(f"unknown network {name!r}; known networks: {', '.join(sorted(NETWORKS))}")
    return NETWORKS[name](n_channels=n_channels, n_classes=n_classes, n_filters=n_filters,
                          normalization=normalization, has_dropout=has_dropout)
