"""CPS: Cross Pseudo Supervision (Chen, Yuan, Zeng, Wang, "Semi-Supervised Semantic Segmentation with Cross Pseudo
Supervision", CVPR 2021, arXiv 2106.01226).

Two VNets of one architecture but different initialisations (A kaiming-normal, B xavier-normal); each one's hard
argmax is the other's cross-entropy target, on the labeled and the unlabeled volumes alike (docs/methods.md#cps):

    L = S(z_A[:n_l], y) + S(z_B[:n_l], y) + λ·[CE(z_A, argmax z_B) + CE(z_B, argmax z_A)]

with S = CE + soft Dice (foreground, batch Dice, ``-dice``), all unweighted. It is the skeleton that DHC and the
class-weighted baselines (cls, crest, simis) extend.
"""
from cotraining import CoTraining
from engine import run


class CPS(CoTraining):
    """Cross pseudo supervision of two VNets (A kaiming, B xavier), unweighted CE + Dice and CE to the peer."""
    name = "cps"
    defaults = {"base_lr": 1e-3, "cps_w": 1.0, "cps_rampup": False}  # the original's argparse defaults

    def training_step(self, x_l, y_l, x_u, step):
        logits_a, logits_b, n_l = self.forward_both(x_l, x_u)
        loss_sup, loss_cps = self.cps_pair(logits_a, logits_b, y_l, n_l)  # no class weights
        return {"loss": loss_sup + step.unsup_w * loss_cps, "sup": loss_sup, "cps": loss_cps}


if __name__ == "__main__":
    run(CPS)
