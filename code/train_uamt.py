"""UA-MT: Uncertainty-aware Self-ensembling Model (Yu, Wang, Li, Fu & Heng, MICCAI 2019, arXiv 1907.07034).

A mean teacher whose consistency target is trusted only where the teacher is certain: the predictive entropy of
T = 8 noisy, dropout-active teacher passes must stay under a threshold that is ramped up during training.
Spec: docs/methods.md#uamt, (uamt-1)-(uamt-6); the student/EMA-teacher machinery is ``meanteacher.MeanTeacher``.

Faithful on purpose (docs/methods.md#uamt): the binary constants of the left-atrium code are kept in the
multi-class setting (threshold scale ln 2, consistency normaliser 2; ``--uamt_entropy_scale multiclass`` uses
ln C and C); the EMA's global step is the epoch (``--ema_step iteration`` for the iteration counter); the teacher
is independently initialised and runs in train mode; supervised loss 0.5·(CE + soft Dice with smoothing 1e-8).
"""
import math

import torch
import torch.nn.functional as F

from engine import run
from meanteacher import MeanTeacher, update_ema_variables  # noqa: F401  (public API of this module)
from utils.device import at_least_fp32
from utils.loss import RobustCrossEntropyLoss, SoftDiceLoss
from utils.ramps import sigmoid_rampup

MC_PASSES = 8  # T: teacher passes for the uncertainty, run as T/2 passes over the unlabeled batch repeated twice


def gaussian_noise(x):
    """The teacher's input noise (uamt-2): N(0, 0.1²) clipped to [−0.2, 0.2], shaped like ``x``."""
    return torch.clamp(torch.randn_like(x) * 0.1, -0.2, 0.2)


def softmax_mse_loss(a, b):
    """Element-wise ``(softmax(a) − softmax(b))²`` over the class dim 1 of two logit tensors; no reduction."""
    return (torch.softmax(at_least_fp32(a), 1) - torch.softmax(at_least_fp32(b), 1)) ** 2


def uncertainty_threshold(epoch, max_epoch, num_classes=2):
    """(uamt-4) ``τ_e = (0.75 + 0.25·exp(−5(1 − e/E)²))·ln(num_classes)``; the original's ln 2 by default."""
    return (0.75 + 0.25 * sigmoid_rampup(epoch, max_epoch)) * math.log(num_classes)


def predictive_uncertainty(pass_logits):
    """(uamt-3) Entropy of the mean softmax over passes: ``[T, B, C, D, H, W]`` logits -> ``[B, 1, D, H, W]``,
    ``U = −Σ_c p̄_c·log(p̄_c + 1e-6)`` computed in fp32."""
    mean_prob = torch.softmax(pass_logits.float(), 2).mean(0)
    return -(mean_prob * torch.log(mean_prob + 1e-6)).sum(1, keepdim=True)


def uamt_consistency_loss(student_u, teacher_u, uncertainty, threshold, num_classes=2):
    """(uamt-5) ``Σ M·(softmax(z_s) − softmax(z_t))² / (num_classes·Σ M + 1e-16)`` with ``M = 1[U < τ]`` of shape
    [B, 1, ...]: the numerator sums over classes, the denominator counts voxels (times the original's 2)."""
    mask = (uncertainty < threshold).float()
    return (mask * softmax_mse_loss(student_u, teacher_u)).sum() / (num_classes * mask.sum() + 1e-16)


class UAMT(MeanTeacher):
    """UA-MT: student VNet + EMA teacher, entropy-masked softmax-MSE consistency."""
    name = "uamt"
    init = "default"  # no explicit init for either net

    @classmethod
    def add_args(cls, parser):
        super().add_args(parser)
        parser.add_argument("--uamt_entropy_scale", choices=("binary", "multiclass"), default="binary",
                            help="constants of the uncertainty threshold and consistency normaliser: ln 2 and 2 "
                                 "as the original (binary LA code), or ln C and C")

    def __init__(self, cfg):
        super().__init__(cfg)
        self.ce, self.dice = RobustCrossEntropyLoss(), SoftDiceLoss(smooth=1e-8)
        self.scale_classes = 2 if cfg.uamt_entropy_scale == "binary" else cfg.num_cls

    @torch.no_grad()
    def mc_uncertainty(self, x_u):
        """(uamt-3) T noisy teacher passes: T/2 forwards of ``x_u`` repeated twice (u0, u1, u0, u1), stacked in order,
        so row k of the [T·B_u] stack belongs to sample k mod B_u -> ``[B_u, 1, D, H, W]``."""
        x_r = x_u.repeat(2, 1, 1, 1, 1)
        passes = [self.teacher(x_r + gaussian_noise(x_r)) for _ in range(MC_PASSES // 2)]
        logits = torch.cat(passes).float()
        return predictive_uncertainty(logits.reshape(MC_PASSES, x_u.shape[0], *logits.shape[1:]))

    def training_step(self, x_l, y_l, x_u, step):
        n_l = x_l.shape[0]
        x_t = x_u + gaussian_noise(x_u)                                  # (uamt-2) drawn first, as the original
        logits = self.student(torch.cat([x_l, x_u]))
        with torch.no_grad():
            teacher_logits = self.teacher(x_t)                           # the consistency target: one pass
        uncertainty = self.mc_uncertainty(x_u)
        y = y_l[:, 0]
        loss_sup = 0.5 * (self.ce(logits[:n_l], y) + self.dice(F.softmax(at_least_fp32(logits[:n_l]), 1), y))
        threshold = uncertainty_threshold(step.epoch, self.cfg.max_epoch, self.scale_classes)  # current epoch
        loss_con = uamt_consistency_loss(logits[n_l:], teacher_logits, uncertainty, threshold, self.scale_classes)
        return {"loss": loss_sup + step.unsup_w * loss_con, "sup": loss_sup, "cps": loss_con,  # (uamt-6)
                "certain": (uncertainty < threshold).float().mean()}


if __name__ == "__main__":
    run(UAMT)
