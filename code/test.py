"""Sliding-window inference of a trained run -> one NIfTI label map per case.

See docs/pipeline.md#sliding-window-inference; quirks (docs/original-quirks.md) Q40 (uint8 labels with geometry), Q41
(padding), Q42 (one preprocessing path, Synapse halving for every method), Q43 (architecture from run.json, --cps
A|B|AB), Q44 (checkpoint loaded once with map_location). Usage, from the repository root:

    python code/test.py --task synapse --exp Task_synapse_20p/dhc/fold1 --cps AB [--speed 0] [--device auto]

Writes ``logs/<exp>/predictions_<cps>/<id>.nii.gz`` (the original's path; ``<cps>`` is the --cps value, or
``None`` without one, as in the original; an {A, B} checkpoint tested without --cps uses AB). The set is written
into a staging folder and replaces the previous set as a whole only when every case is done, so an interrupted
run (Ctrl-C, SIGTERM, an error) leaves the old set untouched and removes its staging folder (after kill -9, the next
run does).
"""
import argparse
import logging
import os
import shutil
import sys

import torch
from tqdm import tqdm

from utils.checkpoint import load_net, load_run_nets, read_run_config, select_nets  # noqa: F401 (tests use them)
from utils.inference import (STRIDES, prepare_case, sliding_window_predict, strides_for,
                             write_label_map as write_prediction)
from utils.io import ConfigError, DataError, cli_main, exp_dir, is_out_of_memory, read_list, remove_stale_tmp
from utils import distributed
from utils.device import resolve_device
from utils.task import get_task

log = logging.getLogger("test")


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
    run_nets = load_run_nets(task, args.exp, args.cps, device)
    nets, patch_size = run_nets.nets, run_nets.patch_size
    out_dir = prediction_dir(args.exp, args.cps, dict.fromkeys(run_nets.layout))
    stride_xy, stride_z = strides_for(args.speed, patch_size)
    log.info("%s x%d (%s) on %s, speed %d -> %s", run_nets.spec["name"], len(nets),
             "+".join(map(str, run_nets.keys)), device, args.speed, out_dir)
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
