"""DST: Debiased Self-Training (Chen, Jiang, Wang, Wan, Wang, Long, NeurIPS 2022, arXiv 2202.07136), as the DHC
authors ported it to 3-D segmentation on the two-net CPS template.

Each net is a ``VNet_Decoupled`` (one encoder, main / pseudo / worst decoders): the main head learns from the
peer's confident pseudo-head argmax, and a worst-case head, trained through a gradient-reversal layer, estimates
how far the representation lets unlabeled predictions be pushed (docs/methods.md#dst, equations (T1)-(T4)).

Faithful on purpose: pseudo-labels come from the *pseudo* decoders and train the *main* decoders, so
``decoder_pseudo`` never receives a gradient and keeps its random init (``--train_pseudo_head`` trains it as the
paper does); the cross term and the worst-case term are both scaled by the ramped weight; A kaiming, B xavier.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from cotraining import CoTraining
from engine import run
from models.vnet_dst import WarmStartGradientReverseLayer  # noqa: F401 (public API of this module)
from utils.device import at_least_fp32
from utils.io import ConfigError
from utils.loss import WeightedCrossEntropyLoss

CONFIDENCE = 0.95  # a voxel's pseudo-label counts if its softmax maximum is strictly above this


class WorstCaseEstimationLoss(nn.Module):
    """(T3): ``η'·CE(y_l_adv, argmax y_l) + mean_v −log(min(1, 1 − softmax(y_u_adv)_ŷ + 1e-6))``, ŷ = argmax y_u.

    ``y_l`` / ``y_u`` are the main head's logits (only their argmax is used: no gradient reaches them), the
    ``_adv`` ones the worst head's; all ``[B, C, D, H, W]``. η' = 2 as DST."""

    def __init__(self, eta_prime=2.0):
        super().__init__()
        self.eta_prime = eta_prime

    def forward(self, y_l, y_l_adv, y_u, y_u_adv):
        loss_l = self.eta_prime * F.cross_entropy(y_l_adv, y_l.argmax(1))
        away = torch.clamp(1.0 - torch.softmax(at_least_fp32(y_u_adv), 1) + 1e-6, max=1.0)  # fp32 as CUDA autocast
        loss_u = F.nll_loss(torch.log(away), y_u.argmax(1))
        return loss_l + loss_u


def confident_labels(logits):
    """(T1): detached ``(argmax, mask)`` of softmax(logits), mask = 1 where the maximum exceeds CONFIDENCE."""
    conf, labels = torch.softmax(at_least_fp32(logits.detach()), 1).max(1)  # fp32 as CUDA autocast
    return labels, (conf > CONFIDENCE).float()


class DST(CoTraining):
    """DST on two decoupled VNets: main head from the peer's confident pseudo-labels, worst head through a GRL."""
    name = "dst"
    network = "VNet_Decoupled"
    ddp_find_unused = True  # torchrun: the original's step leaves the pseudo decoder without gradients
    defaults = {"cps_rampup": True}  # the original's -r is on by default (and cannot be turned off there)

    @classmethod
    def add_args(cls, parser):
        parser.add_argument("--train_pseudo_head", action="store_true",
                            help="the paper's decoupling: the peer's confident *main*-head labels train the "
                                 "*pseudo* decoder and the main decoder learns from labels only (the original "
                                 "trains the main decoder on the untrained pseudo decoder's labels)")

    def __init__(self, cfg):
        super().__init__(cfg)
        if cfg.cps_loss != "wce":  # the original has no other branch (NameError)
            raise ConfigError(f"dst: --cps_loss must be wce (the masked cross-entropy), got {cfg.cps_loss!r}")
        self.masked_ce = WeightedCrossEntropyLoss()  # Σ m·CE / (B·D·H·W): mean over every voxel
        self.worst_case = WorstCaseEstimationLoss()

    def training_step(self, x_l, y_l, x_u, step):
        (z_a, p_a, w_a), (z_b, p_b, w_b), n_l = self.forward_both(x_l, x_u)  # (main, pseudo, worst) per net
        loss_sup = self.sup_losses["A"](z_a[:n_l], y_l) + self.sup_losses["B"](z_b[:n_l], y_l)
        if self.cfg.train_pseudo_head:  # peer's main head teaches the own pseudo head
            (t_a, m_a), (t_b, m_b), student_a, student_b = confident_labels(z_a), confident_labels(z_b), p_a, p_b
        else:  # the original: peer's pseudo head teaches the own main head (T2)
            (t_a, m_a), (t_b, m_b), student_a, student_b = confident_labels(p_a), confident_labels(p_b), z_a, z_b
        loss_cps = self.masked_ce(student_a, t_b, m_b) + self.masked_ce(student_b, t_a, m_a)
        loss_worst = (self.worst_case(z_a[:n_l], w_a[:n_l], z_a[n_l:], w_a[n_l:])
                      + self.worst_case(z_b[:n_l], w_b[:n_l], z_b[n_l:], w_b[n_l:]))
        loss = loss_sup + step.unsup_w * (loss_cps + loss_worst)  # (T4)
        return {"loss": loss, "sup": loss_sup, "cps": loss_cps, "worst": loss_worst}

    def after_optimizer_step(self, step):
        for net in self.nets.values():  # also after a step the GradScaler skipped, as the original
            net.step()

    def on_epoch_end(self, epoch):
        return {"grl_coeff": self.nets["A"].decoder_worst.grl_layer.coeff()}

    def state_dict(self):
        return {**super().state_dict(),
                "grl_iter": {k: net.decoder_worst.grl_layer.iter_num for k, net in self.nets.items()}}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        for k, net in self.nets.items():
            net.decoder_worst.grl_layer.iter_num = state["grl_iter"][k]


if __name__ == "__main__":
    run(DST)
