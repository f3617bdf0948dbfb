"""CLD: Calibrating Label Distribution (Lin, Yao, Li, Zheng & Li, "Calibrating Label Distribution for
Class-Imbalanced Barely-Supervised Knee Segmentation", MICCAI 2022, arXiv 2205.03644), as DHC's baseline on two
co-trained VNets (docs/methods.md#cld).

Idea: calibrate co-training to the label distribution: static class weights from the labeled voxel counts in
every loss, and each net keeps per-class confidences on the labeled data and samples the voxels it predicts as a
low-confidence class more often in its cross-supervision loss (docs/methods.md#cld, equations (cld-1)-(cld-5)).
Faithful: weights (max N / N_c)^(1/3) shared by both nets and given to the supervised loss when it is built, as
the original, so each ``--sup_loss`` name uses them as ``make_loss_function`` does (default ``w_ce+dice``: CE and
Dice weighted; ``wce+dice``: the CE only; ``ce``, ``ce+dice``: unweighted); a random start for the confidences
(B cloned from A), an update every ``--confs_iter`` (8) calls with EMA 0.999, rate exponent 0.5, the mask from the
student's own argmax, the cross CE averaged over all voxels. The original's position-based cropping is absent there
too. Unlike the original, a class absent from the labeled set gets the rarest present class's weight instead of
infinity (which breaks training).
"""
import torch

from cotraining import CoTraining, hard_labels
from data.dataset import class_counts
from engine import run
from utils.distributed import all_reduce_sum, world_size
from utils.io import ConfigError
from utils.loss import WeightedCrossEntropyLoss, make_loss_function

MOMENTUM, UPDATE_ITER, GAMMA = 0.999, 8, 0.5


def class_weights(labels, num_cls, absent="rarest"):
    """(cld-1) ``w_c = (max_k N_k / N_c)^(1/3)`` (float32 ``[C]``) from an iterable of label arrays or tensors (or a
    dataset: its full stored labeled volumes). A class with N_c = 0 gets the largest finite weight
    (``absent="rarest"``) or infinity as the original (``absent="inf"``)."""
    if hasattr(labels, "iter_stored_labels"):
        labels = labels.iter_stored_labels()
    device = None
    if torch.is_tensor(labels):
        labels, device = [labels], labels.device
    arrays = [label.cpu().numpy() if torch.is_tensor(label) else label for label in labels]
    counts = torch.from_numpy(class_counts(arrays, num_cls)).double()
    weights = (counts.max() / counts) ** (1 / 3)  # N_c = 0 -> inf
    if absent == "rarest":
        weights = torch.where(counts > 0, weights, weights[counts > 0].max())
    return weights.float() if device is None else weights.float().to(device)


class ConfidenceBank:
    """(cld-2) per-class mean probability of the true class on labeled voxels: accumulated over ``update_iter``
    calls of ``record_data``, then taken as is the first time and EMA'd (``momentum``) afterwards."""

    def __init__(self, num_cls, confs=None, momentum=MOMENTUM, update_iter=UPDATE_ITER):
        self.num_cls, self.momentum, self.update_iter = num_cls, momentum, update_iter
        self.confs = torch.rand(num_cls) if confs is None else confs.clone()  # CPU RNG, as the original
        self.sums, self.counts = torch.zeros(num_cls, dtype=torch.float64), torch.zeros(num_cls, dtype=torch.long)
        self.calls, self.updated = 0, False

    def record_data(self, out, label):
        """Accumulate Σ_v p_y(v) and #v per true class y from logits ``[B, C, ...]`` and labels ``[B, (1,) ...]``."""
        dev = out.device
        if self.sums.device != dev:
            self.confs, self.sums, self.counts = self.confs.to(dev), self.sums.to(dev), self.counts.to(dev)
        label = label.reshape(out.shape[0], 1, *out.shape[2:]).long()
        p_true = torch.softmax(out.detach().float(), dim=1).gather(1, label)
        if world_size() > 1:  # torchrun: the sums and counts of every rank's labeled batch
            self.sums += all_reduce_sum(torch.zeros_like(self.sums).scatter_add_(0, label.flatten(),
                                                                                 p_true.flatten().double()))
            self.counts += all_reduce_sum(torch.bincount(label.flatten(), minlength=self.num_cls))
        else:
            self.sums.scatter_add_(0, label.flatten(), p_true.flatten().double())
            self.counts += torch.bincount(label.flatten(), minlength=self.num_cls)
        self.calls += 1
        if self.calls % self.update_iter == 0:
            new = (self.sums / (self.counts + 1e-12)).float()  # 0 for a class not seen in these calls
            self.confs = self.momentum * self.confs + (1 - self.momentum) * new if self.updated else new
            self.updated = True
            self.sums.zero_()
            self.counts.zero_()

    def get_confs(self):
        return self.confs

    def state_dict(self):
        return {"confs": self.confs, "sums": self.sums, "counts": self.counts, "calls": self.calls,
                "updated": self.updated}

    def load_state_dict(self, state):
        for key, value in state.items():
            setattr(self, key, value.clone() if torch.is_tensor(value) else value)


def cal_sampling_rate(confs, gamma=GAMMA):
    """(cld-3) ``r_c = ((1 − conf_c) / (max_k (1 − conf_k) + 1e-12))^γ``: the least confident class has rate 1."""
    unsure = 1 - confs
    return (unsure / (unsure.max() + 1e-12)) ** gamma


def sampling_mask(pred, rates):
    """(cld-4) keep a voxel predicted as c with probability r_c: ``u > 1 − r_pred`` with one uniform per voxel."""
    u = torch.rand(pred.shape, device=pred.device)
    return (u > 1 - rates.to(pred.device)[pred]).float()


class CLD(CoTraining):
    """CLD on CPS: class-weighted losses, confidence-driven voxel sampling in the cross loss (docs/methods.md#cld)."""
    name = "cld"
    defaults = {"cps_rampup": True}  # the original's -r is on; w 1, lr 1e-3 are the engine's

    @classmethod
    def add_args(cls, parser):
        parser.add_argument("--confs_iter", type=int, default=UPDATE_ITER,
                            help="the confidence banks update every this many iterations (the original's flag)")

    def __init__(self, cfg):
        super().__init__(cfg)
        if cfg.cps_loss != "wce":
            raise ConfigError(f"--cps_loss {cfg.cps_loss!r}: cld supports only 'wce'")
        if cfg.confs_iter < 1:
            raise ConfigError(f"--confs_iter {cfg.confs_iter}: must be >= 1")
        first = ConfidenceBank(cfg.num_cls, update_iter=cfg.confs_iter)
        self.banks = {"A": first, "B": ConfidenceBank(cfg.num_cls, confs=first.get_confs(),
                                                      update_iter=cfg.confs_iter)}
        self.cross_ce = WeightedCrossEntropyLoss()  # weighted per voxel, mean over all voxels
        self.weights = None

    def set_weights(self, weights):
        """The class weights in the cross CE and, as the original builds it, in a new ``--sup_loss`` object per net
        (``make_loss_function(name, weight)``: which terms are weighted depends on the name)."""
        self.weights = weights.to(self.cfg.device)
        self.sup_losses = {k: make_loss_function(self.cfg.sup_loss, weight=self.weights) for k in self.nets}
        self.cross_ce.update_weight(self.weights)

    def on_train_start(self, labeled_ds):
        self.set_weights(class_weights(labeled_ds, self.cfg.num_cls))

    def training_step(self, x_l, y_l, x_u, step):
        logits = dict(zip(("A", "B"), self.forward_both(x_l, x_u)))
        n = x_l.shape[0]
        for k, z in logits.items():
            self.banks[k].record_data(z[:n].detach(), y_l)
        loss_sup = self.sup_losses["A"](logits["A"][:n], y_l) + self.sup_losses["B"](logits["B"][:n], y_l)
        targets = {k: hard_labels(z) for k, z in logits.items()}
        masks = {k: sampling_mask(targets[k], cal_sampling_rate(self.banks[k].get_confs())) for k in logits}
        loss_cps = (self.cross_ce(logits["A"], targets["B"], weight_map=masks["A"])      # (cld-5)
                    + self.cross_ce(logits["B"], targets["A"], weight_map=masks["B"]))
        return {"loss": loss_sup + step.unsup_w * loss_cps, "sup": loss_sup, "cps": loss_cps}

    def on_epoch_end(self, epoch):
        """Each net's sampling rates (from its confidences) and the static class weights."""
        rates = {f"sampling_rate/{k}": cal_sampling_rate(b.get_confs()) for k, b in self.banks.items()}
        return {**rates, "class_weights": self.weights}

    def state_dict(self):
        return {**super().state_dict(), "weights": self.weights,
                "banks": {k: b.state_dict() for k, b in self.banks.items()}}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.set_weights(state["weights"])
        for k, bank in self.banks.items():
            bank.load_state_dict(state["banks"][k])


if __name__ == "__main__":
    run(CLD)
