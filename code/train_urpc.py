"""URPC: Uncertainty Rectified Pyramid Consistency (Luo, Liao, Chen, Song, Chen, Zhang, Chen, Wang, Zhang,
MICCAI 2021; extended in Medical Image Analysis 2022, arXiv 2012.07042).

One deeply supervised 3D U-Net (``unet_3D_ds``) predicts at four decoder scales; on unlabeled crops each scale is
pulled towards the mean of all scales, voxel by voxel weighted by exp(−KL), and the KL itself is minimised
(docs/methods.md#urpc, equations (U1)-(U3)).

Faithful on purpose: the mean target p̄ is not detached; the KL uses ``log(softmax)`` without an epsilon
(``--urpc_log_softmax`` for the stable form); the network's width is the original's fixed 16 first filters
whatever the task (``--n_filters`` changes it); ``best_model.pth`` is the bare state dict.
"""
import torch
import torch.nn.functional as F

from engine import Method, run
from utils.device import at_least_fp32
from utils.loss import RobustCrossEntropyLoss, SoftDiceLoss

URPC_N_FILTERS = 16  # the original's unet_3D_ds(feature_scale=4): filters 16, 32, 64, 128, 256

_ce = RobustCrossEntropyLoss()
_dice = SoftDiceLoss(smooth=1e-8)  # batch dice, background excluded, returns -mean(dice)


def deep_supervision_loss(logits_l, label_l):
    """(U1): ``(Σ_k CE(o_k, y) + Σ_k Dice(softmax o_k, y)) / 8`` over the four heads' labeled logits
    ``[B, C, D, H, W]``; ``label_l`` is ``[B, 1, D, H, W]`` or ``[B, D, H, W]``. The Dice term is negative."""
    ce = sum(_ce(o, label_l) for o in logits_l)
    dice = sum(_dice(torch.softmax(at_least_fp32(o), 1), label_l) for o in logits_l)
    return (ce + dice) / (2 * len(logits_l))


def uncertainty_rectified_loss(logits_u, log_softmax=False):
    """(U2)-(U3) on the four heads' unlabeled logits ``[B, C, D, H, W]``: with p_k = softmax(o_k) and
    p̄ = mean_k p_k (not detached), v_k = Σ_c p̄_c (log p̄_c − log p_k,c) and e_k = exp(−v_k),

        L = mean_k [ mean_{b,c,v}((p̄ − p_k)² e_k) / (mean_{b,v} e_k + 1e-8) + mean_{b,v} v_k ].

    ``log_softmax=True`` takes log p_k from ``log_softmax`` (finite where a probability underflows to 0).
    Softmax, log and exp in fp32, as CUDA autocast runs them (under CPU fp16 autocast log(softmax) would be -inf)."""
    logits_u = [at_least_fp32(o) for o in logits_u]
    probs = [torch.softmax(o, 1) for o in logits_u]
    mean = sum(probs) / len(probs)
    total = 0
    for o, p in zip(logits_u, probs):
        log_p = torch.log_softmax(o, 1) if log_softmax else torch.log(p)
        kl = F.kl_div(log_p, mean, reduction="none").sum(1, keepdim=True)  # v_k, [B, 1, D, H, W]
        weight = torch.exp(-kl)
        total = total + ((mean - p) ** 2 * weight).mean() / (weight.mean() + 1e-8) + kl.mean()
    return total / len(probs)


class URPC(Method):
    """URPC: one deeply supervised U-Net, pyramid consistency on the unlabeled half."""
    name = "urpc"
    network = "unet_3D_ds"
    bare_checkpoint = True

    @classmethod
    def add_args(cls, parser):
        parser.set_defaults(n_filters=URPC_N_FILTERS)  # the original's width on every task, not the VNet's 32
        parser.add_argument("--urpc_log_softmax", action="store_true",
                            help="KL from log_softmax (finite) instead of the original's log(softmax), which is "
                                 "-inf where a probability underflows to 0")

    def __init__(self, cfg):
        super().__init__(cfg)
        self.nets = {"model": self.build_net()}  # kaiming fan_in inside the constructor, as the original

    def training_step(self, x_l, y_l, x_u, step):
        n_l = x_l.shape[0]
        outputs = self.nets["model"](torch.cat([x_l, x_u]))  # (dsv1, dsv2, dsv3, dsv4), dropout on
        loss_sup = deep_supervision_loss([o[:n_l] for o in outputs], y_l)
        loss_con = uncertainty_rectified_loss([o[n_l:] for o in outputs], self.cfg.urpc_log_softmax)
        return {"loss": loss_sup + step.unsup_w * loss_con, "sup": loss_sup, "con": loss_con}


if __name__ == "__main__":
    run(URPC)
