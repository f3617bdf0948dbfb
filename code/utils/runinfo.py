"""The training CLI (the original's flags plus ours), its resolution into one frozen run configuration, and
``run.json`` (everything needed to rebuild the run: test.py reads the network from it, Q43).
Qn: docs/original-quirks.md."""
import argparse
import dataclasses
import json
import os
import platform
import re
import subprocess
import types

import torch

from utils.device import resolve_device
from utils.io import ConfigError, DataError, write_json
from utils.task import REPO_ROOT, get_task, task_names


class RunConfig(types.SimpleNamespace):
    """Frozen namespace: the parsed flags plus task, num_cls, device, amp, rampup_length."""

    def __setattr__(self, key, value):
        raise AttributeError(f"RunConfig is frozen (tried to set {key})")


def method_name(method_cls):
    return getattr(method_cls, "name", None) or method_cls.__name__.lower()


def build_parser(method_cls):
    d = dict(method_cls.defaults)
    p = argparse.ArgumentParser(description=(method_cls.__doc__ or "").strip().splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--task", default="synapse", choices=task_names())
    p.add_argument("--exp", default=None, help="run folder under logs/ (default Task_<task>_<split>/<method>/seed<seed>)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-sl", "--split_labeled", "-s", "--split", dest="split_labeled",
                   default=d.get("split_labeled", "labeled_20p"))
    p.add_argument("-su", "--split_unlabeled", default=None,
                   help="default: the labeled split's partner (labeled_Xp -> unlabeled_Xp, Q8)")
    p.add_argument("-se", "--split_eval", default="eval")
    p.add_argument("-ep", "--max_epoch", type=int, default=None,
                   help="E (epochs 0..E run); default from the task config for the split's label ratio. With "
                        "--resume it may be raised to train longer (the LR schedule, and the ramp-up unless -cr is "
                        "given, then follow the new E); every other training flag must be the run's")
    p.add_argument("--cps_loss", default="wce")
    p.add_argument("--sup_loss", default="w_ce+dice")
    p.add_argument("--batch_size", type=int, default=d.get("batch_size", 2))
    p.add_argument("--num_workers", type=int, default=None,
                   help="loader workers (default: 2 with CUDA as the original; 0 on CPU, where the in-memory "
                        "crops are cheap and workers would compete with the training threads)")
    p.add_argument("--base_lr", type=float, default=d.get("base_lr", 1e-3))
    p.add_argument("-w", "--cps_w", type=float, default=d.get("cps_w", 1.0), help="unsupervised weight w")
    p.add_argument("-r", "--cps_rampup", action=argparse.BooleanOptionalAction, default=d.get("cps_rampup", False),
                   help="sigmoid ramp-up of w (the original's -r; not 'resume', Q14)")
    p.add_argument("-cr", "--consistency_rampup", type=float, default=None, help="ramp-up length (default E)")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="fp16 autocast + GradScaler (default: on for CUDA, off on CPU; on the CPU only for testing the "
                        "AMP path: fp16 autocast there is slower than fp32)")
    p.add_argument("-m", "--mixed_precision", dest="amp", action="store_const", const=True,
                   help="the original's flag: same as --amp")
    p.add_argument("-g", "--gpu", default="0", help="CUDA device index used when --device is auto")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--resume", action="store_true",
                   help="continue from logs/<exp>/ckpts/last.pth with the run's flags (flags that contradict its "
                        "run.json are refused; -ep may be raised, --device/--num_workers may change)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a finished run in logs/<exp> (its checkpoints, logs and predictions_* are removed); "
                        "without it a folder holding best_model.pth or last.pth is refused")
    p.add_argument("--n_filters", type=int, default=None, help="VNet width (default from the task config)")
    p.add_argument("--patch_size", type=int, nargs=3, default=None, metavar=("D", "H", "W"))
    p.add_argument("--eval_every", type=int, default=None, help="validation period in epochs (default task's)")
    p.add_argument("--no_flip", action="store_true", help="train without flips, like the 2023 code (Q26)")
    p.add_argument("--deterministic", action="store_true", help="deterministic cuDNN/algorithms (Q37)")
    p.add_argument("--sync_bn", action="store_true",
                   help="under torchrun on CUDA: BatchNorm statistics over the global batch (SyncBatchNorm); "
                        "default: per-rank statistics, as one GPU of the original sees its own 2 + 2 patches")
    method_cls.add_args(p)
    return p


def default_epochs(task, split_labeled):
    match = re.fullmatch(r"labeled_(\d+)p", split_labeled)
    if match and int(match.group(1)) in task.epochs:
        return task.epochs[int(match.group(1))]
    return max(task.epochs.values())


def resolve_config(method_cls, args):
    """Merge flags, method defaults and task constants into one RunConfig; the CLI wins."""
    task = get_task(args.task)
    v = vars(args).copy()
    split_unlabeled = args.split_unlabeled
    if split_unlabeled is None and method_cls.uses_unlabeled:
        if not args.split_labeled.startswith("labeled_"):
            raise ConfigError(f"-su is required when -sl is {args.split_labeled!r} (expected labeled_Xp)")
        split_unlabeled = "un" + args.split_labeled
    patch = tuple(args.patch_size or task.patch_size)
    if any(s % 16 or s < 16 for s in patch):
        raise ConfigError(f"--patch_size {patch}: every size must be a positive multiple of 16 (VNet downsamples "
                          "4 times)")
    for flag, value, least in (("-ep/--max_epoch", args.max_epoch, 0), ("--batch_size", args.batch_size, 1),
                               ("--eval_every", args.eval_every, 1), ("--num_workers", args.num_workers, 0),
                               ("-cr/--consistency_rampup", args.consistency_rampup, 0),
                               ("--n_filters", args.n_filters, 1)):
        if value is not None and value < least:
            raise ConfigError(f"{flag} {value}: must be >= {least}")
    if args.consistency_rampup is not None and not args.cps_rampup:  # it would be silently ignored
        raise ConfigError(f"-cr/--consistency_rampup {args.consistency_rampup:g}: has no effect without "
                          "-r/--cps_rampup (the ramp-up is off)")
    if args.resume and args.overwrite:
        raise ConfigError("--resume and --overwrite exclude each other (continue the run, or replace it)")
    # "is None", not "or": -ep 0 is one epoch (0..0) and -cr 0 no ramp, as the original
    max_epoch = default_epochs(task, args.split_labeled) if args.max_epoch is None else args.max_epoch
    device = resolve_device(args.device, args.gpu)
    world_size = int(os.environ.get("WORLD_SIZE", 1)) if "RANK" in os.environ else 1  # torchrun's environment
    if "RANK" in os.environ and device.type == "cuda":  # one GPU per rank: cuda:LOCAL_RANK of the visible ones
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    if args.sync_bn and (device.type != "cuda" or world_size == 1):
        raise ConfigError("--sync_bn needs torchrun with several processes on CUDA devices (SyncBatchNorm)")
    # --amp on the CPU: the same fp16 autocast + GradScaler as on CUDA, for testing the AMP path (slower than fp32)
    amp = (device.type == "cuda") if args.amp is None else args.amp
    name = method_name(method_cls)
    exp = args.exp or f"Task_{task.name}_{args.split_labeled.replace('labeled_', '')}/{name}/seed{args.seed}"
    v.update(task=task, method=name, exp=exp, split_unlabeled=split_unlabeled, patch_size=patch,
             max_epoch=max_epoch, device=device, amp=amp, num_cls=task.num_cls, world_size=world_size,
             n_filters=args.n_filters or task.n_filters,
             eval_every=task.eval_every if args.eval_every is None else args.eval_every,
             num_workers=(2 if device.type == "cuda" else 0) if args.num_workers is None else args.num_workers,
             rampup_length=(max_epoch if args.consistency_rampup is None else args.consistency_rampup)
             if args.cps_rampup else None)
    return RunConfig(**v)


def git_commit():
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                             timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def library_versions():
    import numpy
    versions = {"python": platform.python_version(), "torch": torch.__version__, "numpy": numpy.__version__}
    try:
        import SimpleITK
        versions["SimpleITK"] = SimpleITK.Version_VersionString()
    except ImportError:
        pass
    return versions


# run.json entries that must match for --resume: they fix what last.pth and best_model.pth contain
RESUME_KEYS = ("method", "task", "network", "checkpoint_keys")


def run_record(cfg, method):
    """The content of run.json: method, network, checkpoint layout, every flag, provenance."""
    net = next(iter(method.nets.values()))
    return {
        "method": cfg.method, "task": cfg.task.name, "exp": cfg.exp, "seed": cfg.seed,
        "network": {"name": method.network, "n_channels": cfg.task.num_channels, "n_classes": cfg.num_cls,
                    "n_filters": cfg.n_filters, "normalization": getattr(net, "normalization", "batchnorm")},
        "checkpoint_keys": None if method.bare_checkpoint else sorted(method.nets),
        "patch_size": list(cfg.patch_size),
        # torchrun: --batch_size labeled + unlabeled patches per process, so the global batch grows with the ranks
        "world_size": getattr(cfg, "world_size", 1),
        "global_batch": {"labeled": cfg.batch_size * getattr(cfg, "world_size", 1),
                         "unlabeled": cfg.batch_size * getattr(cfg, "world_size", 1) if method.uses_unlabeled else 0},
        "args": {k: (str(v) if isinstance(v, torch.device) else v) for k, v in vars(cfg).items() if k != "task"},
        "task_config": {f.name: (dict(getattr(cfg.task, f.name)) if f.name == "epochs" else getattr(cfg.task, f.name))
                        for f in dataclasses.fields(cfg.task)},
        "git_commit": git_commit(), "versions": library_versions(), "device": str(cfg.device)}


def resume_mismatch(old, new):
    """One line naming the first RESUME_KEYS entry where the stored run.json ``old`` differs from ``new``."""
    for key in RESUME_KEYS:
        a, b = old.get(key), new.get(key)
        if key == "network" and isinstance(a, dict) and isinstance(b, dict):
            diff = [f"{k} {a.get(k)!r} (now {b.get(k)!r})" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
            if diff:
                return "network " + ", ".join(diff)
        elif a != b:
            return f"{key} {a!r} (now {b!r})"
    return None


# run.json "args" that --resume may change: where and how fast the run computes, and -ep (raised to train longer)
RESUME_MAY_CHANGE = ("max_epoch", "rampup_length", "device", "gpu", "num_workers", "world_size", "deterministic")


def read_run_json(path):
    """A stored run.json as a dict; DataError when it is unreadable or not a JSON object."""
    try:
        with open(path) as f:
            info = json.load(f)
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: unreadable run config ({e})") from None
    if not isinstance(info, dict) or not isinstance(info.get("args", {}), dict):
        raise DataError(f"{path}: not a run config (expected a JSON object with an 'args' object)")
    return info


def resume_conflicts(old, new, parser):
    """(conflicts, changes) between the stored run.json ``old`` and this invocation's record ``new`` (both as JSON):
    one ``"--flag now (run: before)"`` per differing setting that --resume must keep, and {key: [before, now]} of
    the RESUME_MAY_CHANGE ones. Settings missing from either side (older records) are not compared."""
    flags = {}
    for action in parser._actions:
        longs = [o for o in action.option_strings if o.startswith("--")]
        if longs:
            flags.setdefault(action.dest, longs[0])
    a_args, b_args = old.get("args", {}), new.get("args", {})
    conflicts, changes = [], {}
    for key in sorted(set(a_args) & set(b_args) - {"resume", "overwrite", "exp"}):  # exp: a moved folder is the run
        before, now = a_args[key], b_args[key]
        if before == now:
            continue
        if key in RESUME_MAY_CHANGE:
            changes[key] = [before, now]
        else:
            conflicts.append(f"{flags.get(key, key)} {now} (run: {before})")
    return conflicts, changes


def write_run_json(cfg, method, folder):
    """run.json beside the checkpoints (``run_record``)."""
    write_json(os.path.join(folder, "run.json"), run_record(cfg, method))
