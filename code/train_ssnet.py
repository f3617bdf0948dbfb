"""SS-Net: "Exploring Smoothness and Class-Separation for Semi-supervised Medical Image Segmentation" (Y. Wu,
Z. Wu, Q. Wu, Z. Ge, J. Cai; MICCAI 2022; arXiv 2203.01324), as run in the DHC paper's table.

Idea: predictions should not change under a virtual adversarial perturbation of the input (smoothness, the LDS
term), and voxel features should lie close to a class-wise memory bank of features from correctly segmented
labeled voxels (class separation; memory bank and learned selectors from Alonso et al., ICCV 2021). One VNet4SSNet,
trained with  L = L_dice + λ·(L_lds + 0.1·(Lc_l + Lc_u))  (docs/methods.md#ssnet, equations (S1)-(S5)).

Faithful by default (docs/methods.md#ssnet "original code"): Dice-only supervision with background, the memory
keeps the *lowest*-scored features (``--memory_keep highest`` keeps the best, as its comment meant), memory-side
weights normalised over a size-1 axis, hence identically 1 (``--memory_weights normalised``), VAT's inner gradient
unscaled under fp16 (``--vat_grad_scale``), CE computed but unused (``--sup_ce`` adds it).
"""
import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F

from engine import Method, run
from utils.device import at_least_fp32
from utils.distributed import all_gather_cat
from utils.loss import SoftDiceLoss


def dice_distance():
    """The Dice "distance" of SS-Net: −mean_c over all classes (background included) of batch soft Dice (S1)."""
    return SoftDiceLoss(smooth=1e-8, do_bg=True)


def split_by_class(features, labels, num_classes):
    """Rows of ``features`` [N, F] per class 0..C-1 of ``labels`` [N], each in its original order, as the
    original's boolean masks give them (one host sync instead of one per class)."""
    labels = labels.reshape(-1)
    counts = torch.bincount(labels, minlength=num_classes).tolist()
    return features[torch.sort(labels, stable=True).indices].split(counts)


class FeatureMemory:
    """Class-wise memory bank: ``memory[c]`` is None or the [n <= elements_per_class, F] projected features of the
    last batch that had correctly predicted class-c voxels, replaced (not appended) at each update (S2)."""

    def __init__(self, elements_per_class=32, n_classes=2, keep="lowest"):
        self.elements_per_class, self.n_classes, self.keep = elements_per_class, n_classes, keep
        self.memory = [None] * n_classes

    @torch.no_grad()
    def add_features_from_sample_learned(self, model, features, labels):
        """Store per present class all features if there are <= elements_per_class, else the ones ranked by
        sigmoid(``contrastive_class_selector_{c}``) (called as the model is, i.e. in train mode: BN batch
        statistics, running statistics updated): the lowest scores first (original) or the highest."""
        for c, feats in enumerate(split_by_class(features.detach(), labels, self.n_classes)):
            if feats.shape[0] > self.elements_per_class:
                score = torch.sigmoid(getattr(model, f"contrastive_class_selector_{c}")(feats))[:, 0]
                feats = feats[torch.sort(score, descending=self.keep == "highest").indices[:self.elements_per_class]]
            if feats.shape[0] > 0:
                self.memory[c] = feats.clone()  # own storage: not a view of this batch's rows (size of last.pth)


def contrastive_class_to_class_learned_memory(model, features, labels, num_classes, memory,
                                              memory_weights="original"):
    """Σ_c mean_ij(D_ij·ŝ_i·r̂_j) / C with D = 1 − cos(features_c, memory[c]) (S3): ŝ = M·s/Σs from
    s = sigmoid(selector_c(features_c.detach())); r̂ from the memory selector on the normalised memory, rescaled
    by its size-1 axis (= 1, original) or by N/Σr ("normalised"). Classes with < 2 features or rows are skipped;
    the memory is a constant. Returns a scalar tensor (0 without any usable class). Norms and sums in fp32, as
    CUDA autocast runs them (the matmul stays in the autocast dtype)."""
    loss = features.new_zeros((), dtype=torch.float32)
    for c, feats in enumerate(split_by_class(features, labels, num_classes)):
        mem = memory[c]
        if mem is None or feats.shape[0] <= 1 or mem.shape[0] <= 1:
            continue
        mem = F.normalize(at_least_fp32(mem.detach().to(features.device)), dim=1)
        dist = 1 - F.normalize(at_least_fp32(feats), dim=1) @ mem.t()                         # [M, N] in [0, 2]
        s = at_least_fp32(torch.sigmoid(getattr(model, f"contrastive_class_selector_{c}")(feats.detach())))  # [M,1]
        dist = dist * ((s.shape[0] / s.sum(dim=0)) * s)
        r = at_least_fp32(torch.sigmoid(getattr(model, f"contrastive_class_selector_memory{c}")(mem))).t()  # [1,N]
        axis = 1 if memory_weights == "normalised" else 0  # the original sums over the size-1 axis: r̂ = r/r
        dist = dist * ((r.shape[axis] / r.sum(dim=axis, keepdim=True)) * r)
        loss = loss + dist.mean()
    return loss / num_classes


@contextlib.contextmanager
def frozen_bn_stats(model):
    """Norm layers stop tracking running statistics (train-mode BN then uses batch statistics and updates
    nothing, num_batches_tracked included); the previous flags are restored on exit."""
    saved = [(m, m.track_running_stats) for m in model.modules() if hasattr(m, "track_running_stats")]
    for m, _ in saved:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m, flag in saved:
            m.track_running_stats = flag


def l2_normalize(d):
    """Each sample of ``d`` [B, ...] divided by (its L2 norm over all its elements + 1e-8)."""
    return d / (d.reshape(d.shape[0], -1).norm(dim=1).view(-1, *[1] * (d.dim() - 1)) + 1e-8)


def _logits(out):
    return out[0] if isinstance(out, (tuple, list)) else out


class VAT3d(nn.Module):
    """LDS = Dice distance between softmax(model(x)) (no grad, target) and softmax(model(x + ε·d_adv)) (S4), with
    d_adv from ``ip`` power iterations of the distance's gradient at x + ξ·d (an inner ``torch.autograd.grad``:
    no parameter gradient, no optimiser step). BN statistics: the target pass updates them, the perturbed passes
    run with tracking off. ``d`` replaces the U[−0.5, 0.5) start direction (drawn on the CPU, as the original);
    both are L2-normalised per sample."""

    def __init__(self, xi=10.0, epi=10.0, ip=1, grad_scale=1.0):
        super().__init__()
        self.xi, self.epi, self.ip, self.grad_scale = xi, epi, ip, grad_scale
        self.distance = dice_distance()

    def forward(self, model, x, d=None):
        with torch.no_grad():
            target = F.softmax(at_least_fp32(_logits(model(x))), dim=1)  # fp32 as CUDA autocast
        # the start direction is drawn from the CPU generator, then moved, as the original (same stream on CUDA)
        d = torch.rand(x.shape, dtype=x.dtype).sub(0.5).to(x.device) if d is None else d.detach().to(x)
        d = l2_normalize(d)
        with frozen_bn_stats(model):
            for _ in range(self.ip):
                d.requires_grad_(True)
                dist = self.distance(F.softmax(at_least_fp32(_logits(model(x + self.xi * d))), dim=1), target)
                (grad,) = torch.autograd.grad(dist * self.grad_scale, d)
                d = l2_normalize(grad)
            return self.distance(F.softmax(at_least_fp32(_logits(model(x + self.epi * d))), dim=1), target)


class SSNet(Method):
    """SS-Net: one VNet4SSNet with VAT smoothness and a class-wise memory-bank contrastive loss."""
    name = "ssnet"
    network = "VNet4SSNet"
    bare_checkpoint = True
    ddp_by_hand = True  # torchrun: VAT's inner autograd.grad and the heads called directly are beyond DDP's reducer

    @classmethod
    def add_args(cls, parser):
        parser.add_argument("--memory_keep", choices=("lowest", "highest"), default="lowest",
                            help="memory bank keeps the lowest-scored features (original) or the highest")
        parser.add_argument("--memory_weights", choices=("original", "normalised"), default="original",
                            help="memory-side weights: identically 1 (original) or N·r/Σr over the memory")
        parser.add_argument("--vat_grad_scale", type=float, default=1.0,
                            help="factor on VAT's inner Dice distance before its gradient (fp16 underflow)")
        parser.add_argument("--sup_ce", action="store_true", help="add the CE the original computes but drops")

    def __init__(self, cfg):
        super().__init__(cfg)
        self.nets = {"model": self.build_net()}  # PyTorch default init
        self.memory = FeatureMemory(elements_per_class=32, n_classes=cfg.num_cls, keep=cfg.memory_keep)
        self.dice = dice_distance()
        self.vat = VAT3d(xi=10.0, epi=10.0, ip=1, grad_scale=cfg.vat_grad_scale)

    def _contrastive(self, net, feats, labels):
        f = net.prediction_head(net.projection_head(feats.reshape(-1, feats.shape[-1])))
        return contrastive_class_to_class_learned_memory(net, f, labels, self.cfg.num_cls, self.memory.memory,
                                                         self.cfg.memory_weights)

    def training_step(self, x_l, y_l, x_u, step):
        net, n_l = self.nets["model"], x_l.shape[0]
        x, y = torch.cat([x_l, x_u]), y_l[:, 0].long()
        logits, embedding = net(x)
        probs = F.softmax(at_least_fp32(logits), dim=1)  # fp32 as CUDA autocast
        pred = probs.argmax(1)
        feats = embedding.permute(0, 2, 3, 4, 1)  # [B, D, H, W, F]
        correct = (pred[:n_l] == y) & (pred[:n_l] > 0)  # correctly predicted foreground voxels (S2)
        head, was_training = net.projection_head, net.projection_head.training
        with torch.no_grad():
            head.eval()  # the original switches the net to eval mode for this projection only
            projected = head(feats[:n_l][correct])
            head.train(was_training)
        self.memory.add_features_from_sample_learned(  # torchrun: every rank's features enter the memory
            net, all_gather_cat(projected), all_gather_cat(y[correct]))
        loss_con_l = self._contrastive(net, feats[:n_l], y)
        loss_con_u = self._contrastive(net, feats[n_l:], pred[n_l:])
        loss_dice = self.dice(probs[:n_l], y)
        loss_sup = (loss_dice + F.cross_entropy(logits[:n_l].float(), y)) if self.cfg.sup_ce else loss_dice
        loss_lds = self.vat(net, x)
        loss = loss_sup + step.unsup_w * (loss_lds + 0.1 * (loss_con_l + loss_con_u))  # (S5)
        return {"loss": loss, "loss_dice": loss_dice, "loss_lds": loss_lds,
                "loss_con_l": loss_con_l, "loss_con_u": loss_con_u}

    def state_dict(self):
        return {**super().state_dict(), "memory": list(self.memory.memory)}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.memory.memory = list(state["memory"])


if __name__ == "__main__":
    run(SSNet)
