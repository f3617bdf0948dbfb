"""The shared training loop: CLI, loaders, AMP, optimisers, schedules, validation, checkpoints, resume, logs.

It knows nothing about any method. A method subclasses ``Method`` (below) and ends its file with
``if __name__ == "__main__": run(MyMethod)``. Described in docs/pipeline.md#loaders and #training-loop and in
docs/methods.md (shared settings); quirks Q3-Q5, Q8, Q30, Q34-Q37 (Qn: docs/original-quirks.md).

Per run: ``on_train_start(labeled_ds)``; per iteration, under autocast: ``training_step(x_l, y_l, x_u, step)`` ->
dict of scalar tensors with a ``loss`` entry; the engine backpropagates and steps one SGD per ``nets`` entry, then
``after_optimizer_step(step)``; per epoch ``on_epoch_end(epoch)``; validation via ``predict(x)``.

Under ``torchrun`` (``utils/distributed.py``): one process per device, DistributedDataParallel around each trained
net inside ``training_step`` only (``ddp_find_unused`` / ``ddp_by_hand`` for steps its reducer cannot follow),
a DistributedSampler per loader, per-rank data seeds, rank 0 validating and writing; at world size 1 the run is
the plain one, bit for bit.
"""
import dataclasses
import json
import logging
import os
import shutil
import sys

import numpy as np
import torch

from utils import distributed, ramps
from utils.device import place_module
from utils.io import (ConfigError, DataError, FolderLock, checkpoint_problem, describe_error, exp_dir, interrupt_exit,
                      is_out_of_memory, remove_stale_tmp, sigterm_raises, torch_save, write_json)
from utils.runinfo import build_parser, read_run_json, resolve_config, resume_conflicts, resume_mismatch, run_record
from utils.runsetup import build_datasets, check_iterations, make_loader, rng_state, seed_everything, set_rng_state, \
    setup_logging, teardown_logging
from utils.validation import validate

log = logging.getLogger("engine")

MAX_NONFINITE_IN_A_ROW = 20  # a run whose loss is NaN/inf this many iterations in a row (across epochs) is broken


@dataclasses.dataclass(frozen=True)
class Step:
    """What a method may know about the schedule at one iteration (values already ramped and lagged, Q34)."""
    epoch: int
    it: int          # iteration within the epoch
    global_it: int   # iterations since the start of training
    lr: float
    unsup_w: float   # λ: the ramped unsupervised / CPS weight


class Method:
    """Base class of every method: no-op hooks, nets in ``self.nets`` (one SGD each), own state via state_dict."""
    uses_unlabeled = True     # False: the engine builds only the labeled loader and passes x_u=None
    drop_last = False         # ADSH's loaders drop the last incomplete batch
    early_stop = True         # the fully supervised script runs all epochs
    network = "VNet"          # models.build_network name recorded in run.json for test.py
    bare_checkpoint = False   # best_model.pth = one bare state_dict instead of {name: state_dict}
    defaults = {}             # CLI default overrides for this method (e.g. base_lr, cps_w)

    has_dropout = True        # the original trains every VNet with Dropout3d on
    ddp_find_unused = False   # under torchrun: DDP's find_unused_parameters (nets with parameters a step leaves out)
    ddp_by_hand = False       # under torchrun: no DDP wrapper, gradients averaged after backward (steps DDP can't follow)

    def __init__(self, cfg):
        self.cfg = cfg
        self.nets = {}  # trained networks, one SGD each; their names are the checkpoint keys
        self.aux = {}   # untrained modules the method owns (EMA teachers): moved to the device, saved in last.pth

    def build_net(self, **overrides):
        """A fresh ``self.network`` for this task and width (PyTorch default init, drawn on the CPU), built through
        ``models.build_network`` so ``run.json`` records what was trained, then placed on the run's device, so an
        initialisation that follows draws from that device's generator as the original's (``.cuda()``, then
        ``kaiming_normal_init_weight``; docs/pipeline.md#initialisation). ``overrides`` go to the builder."""
        from models import build_network
        cfg = self.cfg
        kwargs = {"has_dropout": self.has_dropout, "patch_size": cfg.patch_size, **overrides}  # patch: UNETR_PP
        net = build_network(self.network, cfg.task.num_channels, cfg.num_cls, cfg.n_filters, **kwargs)
        return net if getattr(cfg, "device", None) is None else place_module(net, cfg.device)

    @classmethod
    def add_args(cls, parser):
        """Declare method-specific flags."""

    def on_train_start(self, labeled_ds):
        """Called once before the first epoch (e.g. class-frequency initialisation)."""

    def training_step(self, x_l, y_l, x_u, step):
        raise NotImplementedError

    def after_optimizer_step(self, step):
        """Called after every optimiser step (EMA teachers, counters, banks)."""

    def on_epoch_end(self, epoch):
        """Per-epoch statistics; returns {tag: scalar or 1-D tensor} to log."""
        return {}

    def predict(self, x):
        """Validation logits: the mean of the nets' logits (the original's A+B average)."""
        logits = [net(x) for net in self.nets.values()]
        return sum(logits) / len(logits)

    def best_checkpoint(self):
        """The original's best_model.pth content."""
        if self.bare_checkpoint:
            (net,) = self.nets.values()
            return net.state_dict()
        return {name: net.state_dict() for name, net in self.nets.items()}

    def state_dict(self):
        """Method state beyond the nets' weights (class weights, teachers, banks) for last.pth.
        Subclasses extend the dict returned here."""
        return {"aux": {name: module.state_dict() for name, module in self.aux.items()}}

    def load_state_dict(self, state):
        for name, module in self.aux.items():
            module.load_state_dict(state["aux"][name])


# ----------------------------------------------------------------------------------------------- helpers


def is_main_process():
    """The one place that decides who logs and writes files (rank 0 under torchrun)."""
    return distributed.is_main()


def rank_seed(seed, rank):
    """The data/dropout seed of one rank under torchrun (rank 0 of a multi-process run included)."""
    return seed + 100003 * rank


def fmt_vector(t):
    return np.array2string(np.asarray(t.detach().float().cpu() if torch.is_tensor(t) else t), precision=4,
                           suppress_small=True, max_line_width=200)


def optimize_step(method, optimizers, scaler, cfg, x_l, y_l, x_u, step, ddp=None, average=False):
    """One iteration: zero grads, ``training_step`` under autocast, scaled backward, step every optimiser,
    ``after_optimizer_step``. Returns the method's outputs, or None when the loss is not finite (step skipped).

    Under AMP a non-finite step still goes through the GradScaler as in the original (backward, ``scaler.step``
    finds the inf/NaN gradients and skips, ``scaler.update`` halves the scale); in fp32 nothing is stepped.
    ``ddp``: the DistributedDataParallel wrappers of the nets (torchrun), used by ``training_step`` only;
    ``average``: torchrun without wrappers, gradients averaged over ranks after backward. A step is skipped on
    every rank when the loss of any rank is not finite."""
    zero_grads(optimizers)
    with distributed.ddp_nets(method, ddp), torch.autocast(cfg.device.type, dtype=torch.float16, enabled=cfg.amp):
        out = method.training_step(x_l, y_l, x_u, step)

    def backward_and_step():
        scaler.scale(out["loss"]).backward()
        if average:
            distributed.average_gradients(method.nets.values())
        for opt in optimizers.values():
            scaler.step(opt)
        scaler.update()

    # one host sync per iteration; GradScaler.step syncs anyway under AMP
    if not distributed.all_true(torch.isfinite(out["loss"]), cfg.device):
        if scaler.is_enabled() and out["loss"].requires_grad:
            backward_and_step()  # the scaler sees the inf/NaN gradients, skips and lowers the scale
        zero_grads(optimizers)
        return None
    backward_and_step()
    method.after_optimizer_step(step)
    return out


def zero_grads(optimizers):
    """The original's ``zero_grad()`` (PyTorch 1.8): gradients become zero tensors, not None, so SGD keeps applying
    weight decay and Nesterov momentum to a parameter that once had a gradient also on iterations where it gets
    none (SS-Net's class selectors); a parameter that never had one stays None and untouched
    (docs/pipeline.md#schedules)."""
    for opt in optimizers.values():
        opt.zero_grad(set_to_none=False)


def grads_defined(nets):
    """{net: [names of the parameters holding a gradient tensor]}: saved in last.pth so that a resumed run zeroes
    (and so steps) the same parameters as an uninterrupted one."""
    return {k: [n for n, p in net.named_parameters() if p.grad is not None] for k, net in nets.items()}


def restore_grads_defined(nets, names):
    """Zero gradient tensors for the parameters ``grads_defined`` listed (the state right after ``zero_grads``)."""
    for k, net in nets.items():
        params = dict(net.named_parameters())
        for n in names.get(k, ()):
            params[n].grad = torch.zeros_like(params[n])


def make_optimizers(method, base_lr):
    """One SGD per trained net (docs/pipeline.md#schedules): momentum 0.9, nesterov, weight decay 3e-5."""
    return {name: torch.optim.SGD(net.parameters(), lr=base_lr, momentum=0.9, weight_decay=3e-5, nesterov=True)
            for name, net in method.nets.items()}


class _NullWriter:
    """TensorBoard stand-in for processes that do not write files."""

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


# ----------------------------------------------------------------------------------------------- the loop


class Trainer:
    def __init__(self, method_cls, cfg):
        self.cfg = cfg
        self.folder = exp_dir(cfg.exp)
        seed_everything(cfg.seed, cfg.deterministic)
        self.labeled, self.unlabeled, self.eval_ds = build_datasets(cfg, method_cls)
        check_iterations(cfg, method_cls, self.labeled, self.unlabeled)  # before anything is written
        self.method = method_cls(cfg)  # built from --seed: every rank holds the same nets and teachers
        for module in (*self.method.nets.values(), *self.method.aux.values()):
            place_module(module, cfg.device)
        self.multi = distributed.world_size() > 1  # torchrun with several processes
        self.ddp = distributed.wrap_nets(self.method, cfg.device, method_cls.ddp_find_unused,
                                         getattr(cfg, "sync_bn", False), method_cls.ddp_by_hand)
        if self.multi:  # own data order, crops, flips and dropout masks per rank
            seed_everything(rank_seed(cfg.seed, distributed.rank()), cfg.deterministic)
        self.optimizers = make_optimizers(self.method, cfg.base_lr)
        self.scaler = torch.amp.GradScaler(cfg.device.type, enabled=cfg.amp)
        # -1, not the original's 0: an all-zero first validation still writes best_model.pth (test.py needs it)
        self.start_epoch, self.best_dice, self.best_epoch = 0, -1.0, 0
        self.nonfinite_total = self.nonfinite_row = 0  # the row is counted across epochs
        self.writer, self.writes_files, self.lock, self._notes = None, False, None, []
        self._resumes = []  # run.json "resumes": earlier resumes and this one (epoch, settings changed)

    # -- files
    def _ckpt(self, name):
        return os.path.join(self.folder, "ckpts", name)

    def _save(self, name, obj):
        if self.writes_files:
            torch_save(self._ckpt(name), obj)

    def save_last(self, epoch):
        self._save("last.pth", {
            "epoch": epoch, "best_dice": self.best_dice, "best_epoch": self.best_epoch,
            "nets": {k: n.state_dict() for k, n in self.method.nets.items()},
            "optimizers": {k: o.state_dict() for k, o in self.optimizers.items()},
            "scaler": self.scaler.state_dict(), "method": self.method.state_dict(), "rng": rng_state(),
            "rng_ranks": distributed.gather_objects(rng_state()) if self.multi else None,
            "nonfinite_total": self.nonfinite_total, "nonfinite_row": self.nonfinite_row,
            "grads_defined": grads_defined(self.method.nets)})

    def _check_run_json(self):
        """--resume continues the run that was started: run.json must describe the same method and network, and
        every flag but -ep (and where the run computes, RESUME_MAY_CHANGE) must be the run's (README: Training)."""
        info_path = os.path.join(self.folder, "run.json")
        if not os.path.isfile(info_path):
            self._notes.append(f"warning: no run.json in {self.folder}: cannot check that the flags are the run's")
            return
        old = read_run_json(info_path)
        new = json.loads(json.dumps(run_record(self.cfg, self.method), default=str))
        problem = resume_mismatch(old, new)
        if problem:
            raise DataError(f"{info_path}: cannot resume: the run was trained with {problem}; "
                            "resume with the run's own script and flags")
        conflicts, changes = resume_conflicts(old, new, build_parser(type(self.method)))
        if conflicts:
            raise ConfigError(f"{info_path}: cannot resume with other settings than the run's: {'; '.join(conflicts)}"
                              " (only -ep may be raised; drop these flags or give the run's values)")
        self._resumes = list(old.get("resumes") or []) + [{"changed": changes}]
        if changes:
            self._notes.append("resumed with " + ", ".join(f"{k} {b} (was {a})" for k, (a, b) in changes.items()))

    def _check_epochs_left(self, path, state):
        """A resume that would train no epoch is refused (a finished or early-stopped run)."""
        cfg, last = self.cfg, state["epoch"]
        if last >= cfg.max_epoch:
            raise ConfigError(f"-ep/--max_epoch {cfg.max_epoch}: {path} already holds epoch {last}, the run's last; "
                              "raise -ep to train longer")
        patience = cfg.task.early_stop_patience
        if self.method.early_stop and last % cfg.eval_every == 0 and last - state["best_epoch"] == patience:
            raise ConfigError(f"{path}: the run stopped early at epoch {last} (no improvement for {patience} epochs); "
                              "there is nothing to continue")

    def resume(self):
        """Load last.pth into the nets, optimisers, scaler, method and RNGs, after checking run.json
        (``_check_run_json``) and that an epoch is left to train. Writes nothing; any problem is one error."""
        path = self._ckpt("last.pth")
        self._check_run_json()
        try:
            state = torch.load(path, map_location=self.cfg.device, weights_only=False)
        except Exception as e:  # zip, pickle and EOF errors have no common base class
            raise DataError(f"{path}: unreadable checkpoint ({checkpoint_problem(path, e)}); "
                            "train again with --overwrite") from None
        try:
            for k, net in self.method.nets.items():
                net.load_state_dict(state["nets"][k])
            for k, opt in self.optimizers.items():
                opt.load_state_dict(state["optimizers"][k])
            self.scaler.load_state_dict(state["scaler"])
            self.method.load_state_dict(state["method"])
            ranks = state.get("rng_ranks")
            if self.multi and ranks and len(ranks) == distributed.world_size():
                set_rng_state(ranks[distributed.rank()])
            elif not self.multi:
                set_rng_state(state["rng"])
            else:  # another world size: fresh per-rank streams
                self._notes.append(f"resumed with {distributed.world_size()} processes from a run with "
                                   f"{len(ranks or [0])}: data order and augmentation streams restart")
            self._check_epochs_left(path, state)
            self.start_epoch = state["epoch"] + 1
            self.best_dice, self.best_epoch = state["best_dice"], state["best_epoch"]
            self.nonfinite_total = state["nonfinite_total"]
            self.nonfinite_row = state.get("nonfinite_row", 0)
            restore_grads_defined(self.method.nets, state.get("grads_defined", {}))
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise DataError(f"{path}: does not fit this {self.cfg.method} run ({type(e).__name__}: {first[:300]})"
                            ) from None
        self._notes.append(f"resumed from {path} at epoch {self.start_epoch} (best {self.best_dice:.4f} at epoch "
                           f"{self.best_epoch})")  # logged once train.log is open

    def _claim_folder(self):
        """Before anything is written: lock the run folder (one writer), refuse to replace a finished run without
        --overwrite, remove what an interrupted writer left (.tmp-*) and, for a fresh run, the old run's files."""
        cfg, folder = self.cfg, self.folder
        if cfg.resume and not os.path.isfile(self._ckpt("last.pth")):
            raise DataError(f"{self._ckpt('last.pth')}: no checkpoint to resume from")
        os.makedirs(folder, exist_ok=True)
        self.lock = FolderLock(folder)
        for sub in (folder, os.path.join(folder, "ckpts")):
            remove_stale_tmp(sub, all_pids=True)  # the lock is ours: nobody else writes here
        if cfg.resume:
            return
        finished = [n for n in ("best_model.pth", "last.pth") if os.path.isfile(self._ckpt(n))]
        if finished and not cfg.overwrite:
            raise ConfigError(f"{folder}: holds a trained run (ckpts/{finished[0]}); continue it with --resume, "
                              "replace it with --overwrite, or choose another --exp")
        old = [n for n in os.listdir(folder) if n in ("ckpts", "tensorboard", "train.log", "run.json")
               or n.startswith("predictions_")]
        for name in old:
            path = os.path.join(folder, name)
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
        if old:
            self._notes.append(f"--overwrite: removed the previous run's {', '.join(sorted(old))} from {folder}")

    def _open_outputs(self):
        """Log file, TensorBoard and checkpoints are written by the main process only (DDP-ready)."""
        from torch.utils.tensorboard import SummaryWriter
        self.writes_files = is_main_process()
        error = None
        if self.writes_files:
            try:
                self._claim_folder()
            except (DataError, ConfigError, OSError) as e:
                error = e
        if not distributed.all_true(error is None, self.cfg.device):  # every rank stops when rank 0 cannot write
            raise error or ConfigError(f"{self.folder}: rank 0 could not claim the run folder (its error above)")
        if self.cfg.resume:
            self.resume()
        if self.writes_files:
            os.makedirs(os.path.join(self.folder, "ckpts"), exist_ok=True)
        setup_logging(self.folder if self.writes_files else None)
        if not self.writes_files:  # torchrun: rank 0 logs; the others report warnings only
            logging.getLogger().setLevel(logging.WARNING)
        self.writer = (SummaryWriter(os.path.join(self.folder, "tensorboard")) if self.writes_files
                       else _NullWriter())

    # -- training
    def train_epoch(self, epoch, lr, unsup_w):
        cfg, method = self.cfg, self.method
        for net in method.nets.values():
            net.train()
        for opt in self.optimizers.values():
            for group in opt.param_groups:
                group["lr"] = lr
        labeled = make_loader(self.labeled, cfg, method, epoch=epoch)
        batches = (zip(labeled, make_loader(self.unlabeled, cfg, method, epoch=epoch, stream=1))
                   if self.unlabeled is not None else ((b, None) for b in labeled))
        sums, n_it = {}, 0
        for it, (lab, unlab) in enumerate(batches):
            step = Step(epoch, it, epoch * len(labeled) + it, lr, unsup_w)
            x_l = lab["image"].to(cfg.device, non_blocking=True)
            y_l = lab["label"].to(cfg.device, non_blocking=True).unsqueeze(1)  # [B,1,D,H,W] (fetch_data)
            x_u = None if unlab is None else unlab["image"].to(cfg.device, non_blocking=True)
            out = optimize_step(method, self.optimizers, self.scaler, cfg, x_l, y_l, x_u, step, self.ddp,
                                average=self.multi and not self.ddp)
            if out is None:
                self.nonfinite_total += 1
                self.nonfinite_row += 1
                log.warning("epoch %d it %d: non-finite loss, step skipped (%d in a row)", epoch, it,
                            self.nonfinite_row)
                if self.nonfinite_row >= MAX_NONFINITE_IN_A_ROW:
                    raise FloatingPointError(f"{self.nonfinite_row} non-finite losses in a row (epoch {epoch}, "
                                             f"iteration {it}): training stopped; lower --base_lr or check the data")
                continue
            self.nonfinite_row = 0
            for key, value in out.items():
                sums[key] = sums.get(key, 0.0) + value.detach().float()
            n_it += 1
        if self.multi and sums:  # the logged means are over every rank's iterations
            keys = sorted(sums)
            total = distributed.all_reduce_mean(torch.stack([sums[k] for k in keys]))
            sums = dict(zip(keys, total))
        return {k: (v / max(n_it, 1)).item() for k, v in sums.items()}

    def sync_ranks(self):
        """After an epoch: every rank takes rank 0's BatchNorm statistics of the nets and teachers (each rank's
        forwards updated its own), so validation, checkpoints and a resumed run see one state."""
        for module in (*self.method.nets.values(), *self.method.aux.values()):
            distributed.sync_buffers(module)

    def log_epoch(self, epoch, lr, unsup_w, means, extra):
        w = self.writer
        w.add_scalar("lr", lr, epoch)
        w.add_scalar("cps_w", unsup_w, epoch)
        for key, value in means.items():
            w.add_scalar(f"loss/{key}", value, epoch)
        parts = [f"epoch {epoch}", f"lr {lr:.6f}", f"cps_w {unsup_w:.4f}"]
        parts += [f"{k} {v:.4f}" for k, v in means.items()]
        parts += [f"{tag} {float(v):g}" for tag, v in extra.items()  # e.g. zero_weight_ce_terms (one sync/epoch)
                  if not (torch.is_tensor(v) and v.numel() > 1)]
        log.info(" | ".join(parts))
        for tag, value in extra.items():
            if torch.is_tensor(value) and value.numel() > 1:
                names = ("background",) + tuple(self.cfg.task.class_names)
                w.add_scalars(tag, {names[i] if len(names) == value.numel() else str(i): float(v)
                                    for i, v in enumerate(value.detach().float().cpu())}, epoch)
                log.info("    %s: %s", tag, fmt_vector(value))
            else:
                w.add_scalar(tag, float(value), epoch)

    def maybe_validate(self, epoch):
        """Every eval_every epochs (epoch 0 included): centre-crop Dice, best checkpoint, early stop
        (docs/pipeline.md#validation-and-checkpoints)."""
        cfg = self.cfg
        if epoch % cfg.eval_every != 0:
            return False
        if not self.writes_files:  # under torchrun rank 0 validates alone; the others take its verdict
            return self._share_validation(False)
        per_class = validate(self.method, self.eval_ds, cfg.num_cls, cfg.device)
        mean = float(per_class.mean())
        names = cfg.task.class_names
        for name, value in zip(names, per_class):
            self.writer.add_scalar(f"val_dice/{name}", float(value), epoch)
        self.writer.add_scalar("val_dice/mean", mean, epoch)
        if mean > self.best_dice:  # strictly greater, as the original
            self.best_dice, self.best_epoch = mean, epoch
            self._save("best_model.pth", self.method.best_checkpoint())
        log.info("validation epoch %d: mean dice %.4f (best %.4f at epoch %d) | %s", epoch, mean, self.best_dice,
                 self.best_epoch, " ".join(f"{n} {v:.3f}" for n, v in zip(names, per_class)))
        stop = self.method.early_stop and epoch - self.best_epoch == cfg.task.early_stop_patience
        if stop:
            log.info("early stop: no improvement for %d epochs", cfg.task.early_stop_patience)
        return self._share_validation(stop)

    def _share_validation(self, stop):
        """Rank 0's best Dice, best epoch and early-stop decision on every rank (no-op in one process)."""
        if not self.multi:
            return stop
        shared = distributed.broadcast(torch.tensor([self.best_dice, self.best_epoch, float(stop)],
                                                    dtype=torch.float64, device=self.cfg.device))
        self.best_dice, self.best_epoch = float(shared[0]), int(shared[1])
        return bool(shared[2])

    def fit(self):
        try:
            return self._fit()
        finally:
            if self.lock is not None:
                self.lock.release()
            teardown_logging()

    def _fit(self):
        cfg = self.cfg
        self._open_outputs()  # claims the folder and loads last.pth (--resume) before writing anything
        if self.writes_files:
            record = run_record(cfg, self.method)
            if self._resumes:  # the run's earlier flags stay on record (only RESUME_MAY_CHANGE ones can differ)
                record["resumes"] = self._resumes[:-1] + [dict(self._resumes[-1], epoch=self.start_epoch)]
            write_json(os.path.join(self.folder, "run.json"), record)
        for note in self._notes:
            log.info(note)
        if not cfg.resume:
            self.method.on_train_start(self.labeled)
        log.info("%s on %s: %d labeled, %s unlabeled, %d eval cases; epochs %d..%d; device %s, amp %s",
                 cfg.method, cfg.task.name, len(self.labeled.ids),
                 len(self.unlabeled.ids) if self.unlabeled else 0, len(self.eval_ds.ids), self.start_epoch,
                 cfg.max_epoch, cfg.device, cfg.amp)
        from tqdm import tqdm
        bar = tqdm(range(self.start_epoch, cfg.max_epoch + 1), desc=cfg.exp, disable=not sys.stderr.isatty())
        for epoch in bar:  # E + 1 epochs, 0..E, as the original (Q34)
            lr = ramps.lr_at_epoch(epoch, cfg.max_epoch, cfg.base_lr) if cfg.max_epoch else cfg.base_lr  # -ep 0
            unsup_w = ramps.unsup_weight_at_epoch(epoch, cfg.cps_w, cfg.rampup_length)
            means = self.train_epoch(epoch, lr, unsup_w)
            self.log_epoch(epoch, lr, unsup_w, means, self.method.on_epoch_end(epoch))
            if self.multi:
                self.sync_ranks()
            stop = self.maybe_validate(epoch)
            self.save_last(epoch)
            bar.set_postfix(loss=f"{means.get('loss', float('nan')):.3f}", best=f"{self.best_dice:.3f}")
            if stop or os.environ.get("DHC_STOP_AFTER_EPOCH") == str(epoch):  # the latter: tests of --resume
                break
        self.writer.close()
        if os.environ.get("DHC_DDP_DUMP"):  # tests: every rank's final nets and method state, to compare ranks
            torch_save(os.path.join(os.environ["DHC_DDP_DUMP"], f"rank{distributed.rank()}.pth"),
                       {"nets": {k: n.state_dict() for k, n in self.method.nets.items()},
                        "aux": {k: m.state_dict() for k, m in self.method.aux.items()},
                        "method": self.method.state_dict()})
        if self.nonfinite_total:
            log.warning("%d iterations skipped for non-finite losses", self.nonfinite_total)
        log.info("done: best mean dice %.4f at epoch %d; checkpoint %s", self.best_dice, self.best_epoch,
                 self._ckpt("best_model.pth"))
        return self.best_dice


def out_of_memory_message(cfg):
    if cfg is None:
        return "out of memory"
    return (f"out of memory on {cfg.device} with --batch_size {cfg.batch_size} (per loader), --patch_size "
            f"{' '.join(map(str, cfg.patch_size))}, --n_filters {cfg.n_filters}: lower --batch_size or --patch_size "
            "(or --n_filters)")


def run(method_cls, argv=None):
    """Entry point of every ``train_<method>.py``: bad input, a full disk, an unwritable output, out of memory, or a
    run stopped by non-finite losses -> one ``error: ...`` line on stderr, exit 2. Ctrl-C -> ``interrupted``, exit
    130; SIGTERM -> ``terminated``, 143 (last.pth of the last finished epoch stays: it is replaced atomically)."""
    cfg = None
    try:
        with sigterm_raises():
            cfg = resolve_config(method_cls, build_parser(method_cls).parse_args(argv))
            distributed.init_from_env(cfg.device)  # torchrun: gloo on CPU, NCCL on CUDA
            try:
                return Trainer(method_cls, cfg).fit()
            finally:
                distributed.shutdown()
    except KeyboardInterrupt as e:
        message, code = interrupt_exit(e)
        print(message, file=sys.stderr)
        sys.exit(code)
    except (DataError, ConfigError, FloatingPointError) as e:
        message = str(e)
    except (OSError, MemoryError, RuntimeError) as e:
        if is_out_of_memory(e):
            message = out_of_memory_message(cfg)
        else:
            message = describe_error(e)
            if message is None:
                raise
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)
