"""Supervised VNet reference of the DHC paper: the labeled-only lower bound (``-sl labeled_Xp``) or, on the
whole ``train`` split, the fully supervised upper bound. See docs/methods.md#fully.

Faithful on purpose: PyTorch default init (the original's kaiming call is commented out); unweighted CE + Dice;
batch 4; no early stopping; ``best_model.pth`` is the bare state dict. Accepts the three-seed scripts' flags
(``-w -r -su`` are ignored), so ``train3times_seeds_*.sh -m fully`` works (Q13, docs/original-quirks.md).
"""
from engine import Method, run
from utils.loss import DC_and_CE_loss


class Fully(Method):
    """Fully supervised VNet (labeled data only)."""
    name = "fully"
    uses_unlabeled = False
    early_stop = False
    bare_checkpoint = True
    defaults = {"split_labeled": "train", "batch_size": 4}

    def __init__(self, cfg):
        super().__init__(cfg)
        self.nets = {"model": self.build_net()}  # PyTorch default init
        self.loss = DC_and_CE_loss()  # unweighted CE + (-Dice), foreground only, smooth 1

    def training_step(self, x_l, y_l, x_u, step):
        loss = self.loss(self.nets["model"](x_l), y_l)
        return {"loss": loss}


if __name__ == "__main__":
    run(Fully)
