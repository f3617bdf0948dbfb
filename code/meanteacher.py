"""A student and its EMA teacher: the shared shape of the mean-teacher baselines UA-MT and ACISIS
(docs/methods.md#uamt, docs/methods.md#acisis).

``MeanTeacher`` owns what both repeat: a trained student VNet in ``nets`` and an untrained teacher VNet of the same
configuration in ``aux`` (so it is placed on the device and saved in ``last.pth``, never in ``best_model.pth``),
both constructed and then initialised *independently* (the teacher is not a copy of the student), the teacher's
parameters excluded from autograd and never switched to eval mode (its targets use dropout and batch-statistics
BatchNorm, as the original), and after every optimiser step the parameters-only EMA

    α = min(1 − 1/(g + 1), 0.99),   θ_T ← α·θ_T + (1 − α)·θ_S                       (docs/methods.md#uamt, (uamt-1))

with g = the epoch index by default (the original passes the epoch as its "global step", so α = 0 through epoch 0
and the teacher is a parameter copy of the student), or the iteration counter with ``--ema_step iteration``.
BatchNorm buffers are not averaged: the teacher keeps its own running statistics. Validation, test and the
checkpoint use the student alone (``bare_checkpoint``).
"""
import torch

from cotraining import INITS
from engine import Method


def ema_alpha(global_step, alpha=0.99):
    """The mean teacher's decay: the true average ``1 − 1/(g + 1)`` until it exceeds ``alpha``."""
    return min(1.0 - 1.0 / (global_step + 1), alpha)


@torch.no_grad()
def update_ema_variables(model, ema_model, alpha, global_step):
    """In place, parameters only, in registration order: ``θ_ema ← a·θ_ema + (1 − a)·θ`` with
    ``a = min(1 − 1/(global_step + 1), alpha)``. Buffers (BatchNorm statistics) are left alone. Returns ``a``."""
    a = ema_alpha(global_step, alpha)
    for ema_param, param in zip(ema_model.parameters(), model.parameters()):
        ema_param.mul_(a).add_(param, alpha=1.0 - a)
    return a


class MeanTeacher(Method):
    """Student ``nets['student']`` (trained, checkpointed bare) and EMA teacher ``aux['teacher']``.

    Class attributes a subclass may change: ``init`` (``"default"`` = PyTorch's init for both, UA-MT;
    ``"kaiming"`` for both with independent draws, ACISIS), ``ema_decay`` (the cap 0.99).
    """
    bare_checkpoint = True
    init = "default"
    ema_decay = 0.99

    @classmethod
    def add_args(cls, parser):
        parser.add_argument("--ema_step", choices=("epoch", "iteration"), default="epoch",
                            help="the EMA's global step g in α = min(1 − 1/(g+1), 0.99): the epoch index as "
                                 "the original (α = 0 all through epoch 0), or the iteration counter (mean teacher)")

    def __init__(self, cfg):
        super().__init__(cfg)
        student, teacher = self.build_net(), self.build_net()  # both constructed, then both initialised
        self.nets = {"student": INITS[self.init](student)}
        self.aux = {"teacher": INITS[self.init](teacher).requires_grad_(False)}  # no optimiser, no gradient

    @property
    def student(self):
        return self.nets["student"]

    @property
    def teacher(self):
        return self.aux["teacher"]

    def after_optimizer_step(self, step):
        """The EMA update after every iteration (also when GradScaler skipped the step, as the original)."""
        g = step.epoch if self.cfg.ema_step == "epoch" else step.global_it
        update_ema_variables(self.student, self.teacher, self.ema_decay, g)
