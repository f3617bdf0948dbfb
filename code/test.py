"""Sliding-window inference of a trained run -> one NIfTI label map per case.

See docs/pipeline.md#sliding-window-inference; quirks (docs/original-quirks.md) Q40 (uint8 labels with geometry), Q41
(padding), Q42 (one preprocessing path, Synapse halving for every method), Q43 (architecture from run.json, --cps
A|B|AB), Q44 (checkpoint loaded once with map_location). Usage, from the repository root:

    python code/test.py --task synapse --exp Task_synapse_20p/dhc/fold1 --cps AB [--speed 0] [--device auto]

Writes ``logs/<exp>/predictions_<cps>/<id>.nii.gz`` (the original's path; ``<cps>`` is the --cps value, or
``None`` without one, as in the original; an {A, B} checkpoint tested without --cps uses AB). The set is written
into a staging folder and replaces the previous set as a whole only when every case is done, so an interrupted
run leaves the old set untouched (and its staging folder is removed, at the latest by the next run).
"""
import argparse
import errno
import json
import logging
import os
import shutil
import sys

import numpy as np
import torch
from tqdm import tqdm

from utils.inference import STRIDES, prepare_case, prepare_net, sliding_window_predict
from utils.io import (ConfigError, DataError, atomic_path, cli_main, exp_dir, is_out_of_memory, read_list,
                      remove_stale_tmp)
from utils import distributed
from utils.device import resolve_device
from utils.task import get_task

log = logging.getLogger("test")

# Fallback without run.json, for released checkpoints: the original picks the network by substring of --exp,
# tested in this order (Q43); anything else is two VNets.
EXP_NAME_RULES = (("fully", "VNet"), ("dst", "VNet_Decoupled"), ("urpc", "unet_3D_ds"), ("uamt", "VNet"),
                  ("acisis", "VNet"), ("ssnet", "VNet4SSNet"), ("unetrpp", "UNETR_PP"))
DEFAULT_NETWORK = "VNet"
FIXED_N_FILTERS = {"unet_3D_ds": 16}  # the original builds URPC's U-Net at 16 filters on every task


def build_network(name, n_channels, n_classes, n_filters, normalization="batchnorm", has_dropout=False,
                  patch_size=None):
    """``models.build_network``, imported on use (tests replace this name with a stand-in)."""
    from models import build_network as build
    return build(name, n_channels, n_classes, n_filters, normalization=normalization, has_dropout=has_dropout,
                 patch_size=patch_size)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Sliding-window inference -> logs/<exp>/predictions_<cps>/*.nii.gz")
    p.add_argument("--task", default="synapse")
    p.add_argument("--exp", required=True, help="run folder under logs/, e.g. Task_synapse_20p/dhc/fold1")
    p.add_argument("--split", default="test")
    p.add_argument("--speed", type=int, default=0, choices=sorted(STRIDES),
                   help="window strides (xy, z): 0 = (32, 16), 1 = (64, 16), 2 = (128, 32)")
    p.add_argument("-g", "--gpu", default="0", help="CUDA device index used when --device is auto")
    p.add_argument("--cps", default=None, choices=("A", "B", "AB"),
                   help="nets of an {A, B} checkpoint: A, B or AB (mean of logits); ignored for one net")
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda or cuda:N")
    p.add_argument("--sw_batch_size", "--sw-batch-size", type=int, default=4, help="windows per forward")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="fp16 autocast (default: on for CUDA, off on CPU; the original ran fp32)")
    return p.parse_args(argv)


def read_run_config(task, exp):
    """(network kwargs, checkpoint keys or None if unknown, patch size) from ``run.json``, or from the
    experiment's name without it (released checkpoints, Q43)."""
    net = {"n_channels": task.num_channels, "n_classes": task.num_cls, "n_filters": task.n_filters,
           "normalization": "batchnorm"}
    path = os.path.join(exp_dir(exp), "run.json")
    if not os.path.isfile(path):
        name = next((n for key, n in EXP_NAME_RULES if key in exp), DEFAULT_NETWORK)
        log.info("no run.json in %s: network %s chosen from the experiment name", exp_dir(exp), name)
        return dict(net, name=name, n_filters=FIXED_N_FILTERS.get(name, task.n_filters)), None, \
               tuple(task.patch_size)
    try:
        with open(path) as f:
            run = json.load(f)
        network = run["network"]
        net.update({k: network[k] for k in ("n_channels", "n_classes", "n_filters", "normalization")
                    if k in network}, name=network["name"])
        keys = run.get("checkpoint_keys")
        keys = [None] if keys is None else [str(k) for k in keys]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"{path}: unreadable run config ({type(e).__name__}: {e})") from None
    if run.get("task", task.name) != task.name:
        raise ConfigError(f"{path}: run trained on task {run['task']!r}, but --task is {task.name!r}")
    if net["n_classes"] != task.num_cls:
        raise ConfigError(f"{path}: network has {net['n_classes']} classes, task {task.name} has {task.num_cls}")
    return net, keys, tuple(run.get("patch_size") or task.patch_size)


def load_checkpoint(path, expected_keys=None):
    """{key: state dict} ({None: sd} for a bare state dict, the original's single-net layout), loaded once on
    the CPU (Q44); ``expected_keys`` (run.json's checkpoint_keys) must match the file's layout."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: checkpoint not found (train the run first)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle, zip and weights-only errors have no common base class
        raise DataError(f"{path}: unreadable checkpoint ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    if isinstance(ckpt, dict) and ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        nets = {None: ckpt}
    elif isinstance(ckpt, dict) and ckpt and all(isinstance(v, dict) for v in ckpt.values()):
        nets = {str(k): v for k, v in sorted(ckpt.items())}
    else:
        raise DataError(f"{path}: expected a state dict or a dict of state dicts (the original's {{'A', 'B'}})")
    if expected_keys is not None and sorted(nets, key=str) != sorted(expected_keys, key=str):
        raise DataError(f"{path}: run.json expects {_layout(expected_keys)}, the file has {_layout(nets)}")
    return nets


def _layout(keys):
    keys = list(keys)
    return "a bare state dict" if keys == [None] else "nets " + ", ".join(keys)


def select_nets(ckpt, cps, path):
    """Checkpoint keys to run: a bare state dict ignores --cps (as the original); AB (or no --cps) = every net,
    logits averaged; A / B = that net alone (the original crashed there, Q43)."""
    if None in ckpt:
        return [None]
    if cps in ("A", "B"):
        if cps not in ckpt:
            raise DataError(f"{path}: no net {cps!r} in the checkpoint (has {', '.join(ckpt)})")
        return [cps]
    return list(ckpt)


def state_dict_mismatch(expected, found):
    """One-line summary of why ``found`` does not fit a network whose state dict is ``expected``."""
    for key, value in expected.items():
        if key in found and tuple(found[key].shape) != tuple(value.shape):
            return f"{key} has shape {list(found[key].shape)}, expected {list(value.shape)}"
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    parts = [f"{len(missing)} missing keys (e.g. {missing[0]})"] if missing else []
    parts += [f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})"] if unexpected else []
    return ", ".join(parts)


def load_net(spec, state_dict, where, device):
    """Eval-mode network of ``spec`` with ``state_dict`` (strict); a mismatch is a one-line DataError."""
    kwargs = {k: v for k, v in spec.items() if k != "name"}
    try:
        net = build_network(spec["name"], has_dropout=False, **kwargs)
    except (KeyError, ValueError, NotImplementedError) as e:
        raise ConfigError(f"{where}: cannot build network {spec['name']!r} ({e})") from None
    problem = state_dict_mismatch(net.state_dict(), state_dict)
    if problem:
        raise DataError(f"{where}: not a {spec['name']} checkpoint for {spec['n_classes']} classes ({problem})")
    net.load_state_dict(state_dict, strict=True)
    return prepare_net(net, device)


def write_prediction(path, labels, geometry):
    """uint8 labels with the inference grid's spacing and the source's origin/direction (Q40), atomically."""
    import SimpleITK as sitk
    assert labels.min() >= 0 and labels.max() < 256, "label ids must fit uint8"
    image = sitk.GetImageFromArray(labels.astype(np.uint8))
    image.SetSpacing(geometry.spacing)
    image.SetOrigin(geometry.origin)
    image.SetDirection(geometry.direction)
    with atomic_path(path) as tmp:
        try:
            sitk.WriteImage(image, tmp, True)
        except RuntimeError as e:  # ITK's write errors are RuntimeErrors: name a full disk as one
            if shutil.disk_usage(os.path.dirname(tmp)).free < 2 * labels.size:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path) from None
            raise DataError(f"{path}: cannot write the prediction ({str(e).strip().splitlines()[-1]})") from None


def prediction_dir(exp, cps, ckpt):
    """``logs/<exp>/predictions_<cps>``: named from the CLI value even where a bare checkpoint ignores it (the
    scripts' --cps AB -> predictions_AB); no --cps gives the original's 'None', or 'AB' for several nets."""
    return os.path.join(exp_dir(exp), f"predictions_{cps or ('None' if None in ckpt else 'AB')}")


def replace_folder(staged, final):
    """Put the complete folder ``staged`` at ``final``: the old set is renamed aside, the new one renamed in, the
    old one deleted. Both renames are atomic, so ``final`` holds either the old set or the new one."""
    old = None
    if os.path.lexists(final):
        if not os.path.isdir(final) or os.path.islink(final):
            raise ConfigError(f"{final}: exists and is not a folder; remove it")
        old = os.path.join(os.path.dirname(final), f".tmp-{os.getpid()}-old-{os.path.basename(final)}")
        os.replace(final, old)
    os.replace(staged, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def strides_for(speed, patch_size):
    """``--speed`` strides, capped at the patch: --speed 2 (xy 128) would leave gaps with the phantom's 64."""
    stride_xy, stride_z = STRIDES[speed]
    capped = min(stride_xy, patch_size[1], patch_size[2]), min(stride_z, patch_size[0])
    if capped != (stride_xy, stride_z):
        log.warning("--speed %d strides (xy %d, z %d) capped to the patch %s: (xy %d, z %d)", speed, stride_xy,
                    stride_z, tuple(patch_size), *capped)
    return capped


def run(args):
    task = get_task(args.task)
    if args.sw_batch_size < 1:
        raise ConfigError(f"--sw_batch_size {args.sw_batch_size}: must be >= 1")
    device = resolve_device(args.device, args.gpu)
    if distributed.launched_by_torchrun() and device.type == "cuda":  # one GPU per rank
        device = torch.device("cuda", distributed.local_rank())
    if args.amp and device.type != "cuda":
        raise ConfigError("--amp needs a CUDA device (fp16 autocast); CPU inference runs in fp32")
    ids = read_list(task.split_path(args.split))
    missing = [i for i in ids if not os.path.isfile(os.path.join(task.npy_dir, f"{i}_image.npy"))]
    if missing:  # checked up front so a bad split leaves no partial prediction folder
        raise DataError(f"{os.path.join(task.npy_dir, missing[0] + '_image.npy')}: image not found "
                        f"({len(missing)} of {len(ids)} cases of split {args.split!r} missing)")
    spec, expected_keys, patch_size = read_run_config(task, args.exp)
    ckpt_path = os.path.join(exp_dir(args.exp), "ckpts", "best_model.pth")
    ckpt = load_checkpoint(ckpt_path, expected_keys)
    keys = select_nets(ckpt, args.cps, ckpt_path)
    spec = dict(spec, patch_size=patch_size)  # sizes UNETR_PP's positional embeddings; VNet ignores it
    nets = [load_net(spec, ckpt[k], ckpt_path if k is None else f"{ckpt_path}['{k}']", device) for k in keys]
    out_dir = prediction_dir(args.exp, args.cps, ckpt)
    stride_xy, stride_z = strides_for(args.speed, patch_size)
    log.info("%s x%d (%s) on %s, speed %d -> %s", spec["name"], len(nets), "+".join(map(str, keys)), device,
             args.speed, out_dir)
    if distributed.is_main():
        remove_stale_tmp(exp_dir(args.exp))  # staging folders of killed test runs
    # torchrun: rank 0 names and makes the staging folder, every rank writes its share of the cases into it
    staged = distributed.gather_objects(
        os.path.join(exp_dir(args.exp), f".tmp-{os.getpid()}-{os.path.basename(out_dir)}"))[0]
    if distributed.is_main():
        os.makedirs(staged)
    distributed.barrier()
    done = False
    try:
        for case_id in tqdm(distributed.shard(ids), desc="test", unit="case", disable=None):
            image, geometry = prepare_case(task, case_id)
            try:
                labels, _ = sliding_window_predict(nets, image, patch_size, stride_xy, stride_z, task.num_cls,
                                                   sw_batch_size=args.sw_batch_size, device=device, amp=args.amp,
                                                   return_probs=False)
            except (RuntimeError, MemoryError) as e:
                if not is_out_of_memory(e):
                    raise
                raise ConfigError(f"out of memory on {device} in the sliding window (case {case_id}, shape "
                                  f"{tuple(image.shape)}, patch {' '.join(map(str, patch_size))}, --sw_batch_size "
                                  f"{args.sw_batch_size}): lower --sw_batch_size (or use --device cpu)") from None
            write_prediction(os.path.join(staged, f"{case_id}.nii.gz"), labels, geometry)
        done = True
    finally:  # the set is complete only when every rank finished its share; rank 0 then moves it into place
        if not distributed.all_true(done, device if device.type == "cuda" else "cpu"):
            if distributed.is_main():
                shutil.rmtree(staged, ignore_errors=True)
            if done:  # this rank's share is fine: another rank failed (its error names the cause)
                raise DataError(f"{out_dir}: another process failed; the previous prediction set is kept")
        elif distributed.is_main():
            try:
                replace_folder(staged, out_dir)
            finally:
                shutil.rmtree(staged, ignore_errors=True)
    log.info("wrote %d predictions to %s", len(ids), out_dir)
    return out_dir


@cli_main
def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO if distributed.rank_from_env() == 0 else logging.WARNING,
                        format="%(message)s")
    if distributed.launched_by_torchrun():  # torchrun: the case list is sharded over the ranks
        distributed.init_from_env("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu")
    try:
        run(args)
    finally:
        distributed.shutdown()


if __name__ == "__main__":
    sys.exit(main())
