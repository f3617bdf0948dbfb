"""DePL: Debiased Pseudo-Labeling (Wang, Wu, Lian & Yu, "Debiased Learning from Naturally Imbalanced
Pseudo-Labels", CVPR 2022, arXiv 2201.01490), as DHC's baseline on two co-trained VNets (docs/methods.md#depl).

Idea: pseudo-labels lean towards the classes the model already over-predicts; an EMA q̂ of the model's mean
prediction on unlabeled data is that bias, and removing it by causal inference, softmax(z − τ·log q̂), gives
debiased pseudo-labels (docs/methods.md#depl, equations (depl-1)-(depl-4)). Here q̂ is kept per voxel position of
the training patch, one per net; each net's debiased, ≥ 0.9-confident labels supervise the other net.
Faithful: τ = 1, threshold 0.9, momentum 0.99; q̂ updated after the pseudo-labels from the unlabeled half only;
the adaptive-marginal logits are not used (``--depl_marginal`` to use them). Unlike the original, q̂ is saved.
"""
import torch

from cotraining import CoTraining
from engine import run
from utils.distributed import batch_mean
from utils.loss import WeightedCrossEntropyLoss
from utils.ramps import ema

TAU = 1.0          # the training step's τ (the helper's default is 0.5)
THRESHOLD = 0.9    # kept where the debiased max probability is >= this
MOMENTUM = 0.99    # q̂ EMA
PEER = {"A": "B", "B": "A"}


def initial_qhat(class_num=14, patch_size=(64, 128, 128), device=None):
    """Uniform q̂ = 1/C at every voxel position: ``[1, C, D, H, W]`` float32."""
    return torch.ones(1, class_num, *patch_size, device=device) / class_num


def causal_inference(logits, qhat, tau=0.5):
    """Debiased logits ``logits − τ·log q̂`` (depl-1); q̂ ``[1, C, D, H, W]`` broadcasts over the batch."""
    return logits - tau * torch.log(qhat.to(logits.device))


def update_qhat(probs, qhat, momentum=0.99):
    """(depl-2) q̂ ← m·q̂ + (1 − m)·mean_b probs: the mean is over the batch only, so q̂ stays per voxel."""
    return ema(batch_mean(probs.detach(), dim=0, keepdim=True), qhat.to(probs.device), momentum)  # torchrun: all ranks


class DePL(CoTraining):
    """DePL on CPS: debiased, thresholded pseudo-labels of each net supervise the other (docs/methods.md#depl)."""
    name = "depl"
    defaults = {"cps_rampup": True}  # the original's -r defaults to on; w 1, lr 1e-3 are the engine's

    @classmethod
    def add_args(cls, parser):
        parser.add_argument("--depl_marginal", choices=("unused", "own", "peer"), default="unused",
                            help="adaptive marginal loss: 'unused' as the original (computed, never used); 'own' "
                                 "(the paper) or 'peer' (the original's dead code) adds τ·log q̂ to the "
                                 "unlabeled logits of the cross loss")

    def __init__(self, cfg):
        super().__init__(cfg)
        self.qhat = {k: initial_qhat(cfg.num_cls, cfg.patch_size, cfg.device) for k in self.nets}
        self.cross_ce = WeightedCrossEntropyLoss()  # Σ mask·CE / (all voxels)

    def pseudo_labels(self, logits, net):
        """(depl-3) (targets, mask): argmax and 1[max ≥ 0.9] of softmax(z − τ·log q̂_net), detached."""
        probs = torch.softmax(causal_inference(logits.detach(), self.qhat[net], TAU).float(), dim=1)
        conf, target = probs.max(dim=1)
        return target, (conf >= THRESHOLD).float()

    def training_step(self, x_l, y_l, x_u, step):
        logits = dict(zip(("A", "B"), self.forward_both(x_l, x_u)))
        n = x_l.shape[0]
        loss_sup = self.sup_losses["A"](logits["A"][:n], y_l) + self.sup_losses["B"](logits["B"][:n], y_l)
        labels = {k: self.pseudo_labels(z, k) for k, z in logits.items()}  # q̂ of the previous iteration
        for k, z in logits.items():                                          # then q̂ from the unlabeled half
            self.qhat[k] = update_qhat(torch.softmax(z[n:].detach().float(), dim=1), self.qhat[k], MOMENTUM)
        loss_cps = 0
        for k, z in logits.items():
            target, mask = labels[PEER[k]]
            loss_cps = loss_cps + self.cross_ce(self.marginal_logits(z, k, n), target, weight_map=mask)  # (depl-4)
        return {"loss": loss_sup + step.unsup_w * loss_cps, "sup": loss_sup, "cps": loss_cps}

    def marginal_logits(self, logits, net, n):
        """The student's logits in (depl-4): raw (original), or the unlabeled half + τ·log q̂ (fresh q̂)."""
        mode = self.cfg.depl_marginal
        if mode == "unused":
            return logits
        qhat = self.qhat[net if mode == "own" else PEER[net]]
        return torch.cat([logits[:n], logits[n:] + TAU * torch.log(qhat)])

    def on_epoch_end(self, epoch):
        """Each net's q̂ averaged over positions: the estimated class prior."""
        return {f"qhat/{k}": q.mean(dim=(0, 2, 3, 4)) for k, q in self.qhat.items()}

    def state_dict(self):
        return {**super().state_dict(), "qhat": dict(self.qhat)}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.qhat = {k: q.to(self.cfg.device) for k, q in state["qhat"].items()}


if __name__ == "__main__":
    run(DePL)
