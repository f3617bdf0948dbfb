"""Figures of a finished run: an overlay of one test case, learning curves, and the per-class Dice bar chart.

Usage, from the repository root (``make demo`` runs it on the DHC folds):
    python code/plot_run.py --exp Task_phantom_20p/dhc            # a method folder (fold1, fold2, ... inside)
    python code/plot_run.py --exp logs/Task_phantom_20p/dhc/fold1  # or one run folder
    python code/plot_run.py --scan img.nii.gz --pred out/img.nii.gz [--label label.nii.gz] --task T --out DIR
                                                                   # a raw scan segmented by predict.py
Writes into ``<exp>/figures/`` (or ``--out DIR``) and prints each path:
- ``overlay_<case>.png``: axial and coronal CT slices of one test case with the ground truth and the prediction
  (``predictions_<cps>/<case>.nii.gz`` of test.py) side by side, one colour per organ, legend, per-case Dice;
- ``curves.png``: per fold, validation Dice per organ (and mean) and the training losses against epoch, read
  from the run's TensorBoard events (``val_dice/*``, ``loss/*``) or, without them, from ``train.log``;
- ``dice_bars.png``: the per-class Dice bar chart of ``make_table.py`` from the folder's ``results.json``
  (evaluate_Ntimes.py); skipped with a note when there is none (a single fold before evaluation).
A figure whose inputs are missing is skipped with a one-line note; nothing found at all is an error.
"""
import argparse
import glob
import json
import logging
import os
import re
import sys

import numpy as np

from utils.io import ConfigError, DataError, atomic_path, cli_main, log_root

log = logging.getLogger("plot_run")

# 13 distinguishable organ colours (Synapse order; AMOS's two extra organs take the last ones)
ORGAN_COLOURS = ("#e6194b", "#3cb44b", "#ffe119", "#4363d8", "#f58231", "#911eb4", "#46f0f0", "#f032e6",
                 "#bcf60c", "#fabebe", "#008080", "#e6beff", "#9a6324", "#fffac8", "#800000", "#aaffc3")

EPOCH_RE = re.compile(r"\bepoch (\d+) \| (.*)$")
VAL_RE = re.compile(r"\bvalidation epoch (\d+): mean dice ([-\d.eE+na]+) .*?\| (.*)$")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Overlay, learning-curve and Dice-bar figures of a run folder.")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--exp", help="run folder or method folder (fold*/ inside); a path or under logs/")
    what.add_argument("--scan", help="a raw NIfTI scan: draw predict.py's labels of it (--pred) instead of a run")
    p.add_argument("--out", default=None, help="output folder (default <exp>/figures; with --scan: required)")
    p.add_argument("--case", default=None, help="test case of the overlay (default: the first predicted one)")
    p.add_argument("--cps", default=None, help="predictions_<cps> folder to read (default: the first found)")
    p.add_argument("--pred", help="with --scan: predict.py's label map of the scan")
    p.add_argument("--label", help="with --scan: its ground-truth labels (optional; adds per-organ Dice)")
    p.add_argument("--task", help="with --scan: the task (classes and CT window)")
    args = p.parse_args(argv)
    if args.scan is not None and not (args.pred and args.task and args.out):
        p.error("--scan needs --pred, --task and --out")
    if args.scan is None and (args.pred or args.label or args.task):
        p.error("--pred, --label and --task go with --scan")
    return args


# ----------------------------------------------------------------------------------------------- discovery
def resolve_folder(exp):
    for candidate in (exp, os.path.join(log_root(), exp)):
        if os.path.isdir(candidate):
            return os.path.normpath(candidate)
    raise ConfigError(f"--exp {exp}: no such folder here or under {log_root()}/")


def is_run(folder):
    return any(os.path.exists(os.path.join(folder, n)) for n in ("run.json", "train.log", "tensorboard"))


def find_runs(folder):
    """The run folders of ``folder``: itself, or its sub-folders that are runs (fold1, fold2, ... in order)."""
    if is_run(folder):
        return [folder]
    subs = [os.path.join(folder, d) for d in sorted(os.listdir(folder), key=_natural)]
    return [s for s in subs if os.path.isdir(s) and is_run(s)]


def _natural(name):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def run_info(run):
    path = os.path.join(run, "run.json")
    try:
        with open(path) as f:
            info = json.load(f)
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}  # valid JSON but not a run config: as if missing


# ------------------------------------------------------------------------------------------------- curves
def read_tensorboard(run):
    """{"val": {organ|mean: (epochs, values)}, "loss": {key: (epochs, values)}} from the run's events, or None."""
    folder = os.path.join(run, "tensorboard")
    if not glob.glob(os.path.join(folder, "events.out.tfevents.*")):
        return None
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    logging.getLogger("tensorboard").setLevel(logging.WARNING)  # no "No path found after ..." notes
    acc = EventAccumulator(folder, size_guidance={"scalars": 0})
    acc.Reload()
    curves = {"val": {}, "loss": {}}
    for tag in acc.Tags().get("scalars", []):
        group, _, name = tag.partition("/")
        if group in ("val_dice", "loss") and name:
            events = {e.step: e.value for e in acc.Scalars(tag)}  # last write of a step wins (resumed runs)
            steps = sorted(events)
            kind = "val" if group == "val_dice" else "loss"
            curves[kind][name] = (np.array(steps), np.array([events[s] for s in steps]))
    return curves if curves["val"] or curves["loss"] else None


def read_train_log(run, class_names=None):
    """The same curves parsed from train.log lines ``epoch N | lr .. | loss ..`` and ``validation epoch N: ...``."""
    path = os.path.join(run, "train.log")
    if not os.path.isfile(path):
        return None
    val, loss = {}, {}
    with open(path, errors="replace") as f:
        for line in f:
            m = VAL_RE.search(line)
            if m:
                epoch = int(m.group(1))
                val.setdefault("mean", {})[epoch] = float(m.group(2))
                tokens = m.group(3).split()
                for name, value in zip(tokens[::2], tokens[1::2]):
                    val.setdefault(name, {})[epoch] = float(value)
                continue
            m = EPOCH_RE.search(line)
            if m:
                epoch = int(m.group(1))
                for part in m.group(2).split(" | "):
                    key, _, value = part.strip().rpartition(" ")
                    if key and key not in ("lr", "cps_w"):
                        try:
                            loss.setdefault(key, {})[epoch] = float(value)
                        except ValueError:
                            pass
    curves = {"val": _as_arrays(val), "loss": _as_arrays(loss)}
    return curves if curves["val"] or curves["loss"] else None


def _as_arrays(series):
    """{name: {epoch: value}} -> {name: (epochs, values)} in epoch order."""
    return {k: (np.array(sorted(v)), np.array([v[e] for e in sorted(v)])) for k, v in series.items()}


def read_curves(run):
    return read_tensorboard(run) or read_train_log(run)


def plot_curves(runs, path):
    """One column per run: validation Dice per organ (+ mean, black) on top, training losses below."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    found = [(os.path.basename(r), read_curves(r)) for r in runs]
    found = [(name, c) for name, c in found if c is not None]
    if not found:
        return None
    fig, axes = plt.subplots(2, len(found), figsize=(4.6 * len(found) + 1.8, 7), squeeze=False)
    organ_handles = {}
    for col, (name, curves) in enumerate(found):
        ax = axes[0, col]
        organs = [k for k in curves["val"] if k != "mean"]
        for i, organ in enumerate(organs):
            x, y = curves["val"][organ]
            organ_handles[organ] = ax.plot(x, 100 * y, color=ORGAN_COLOURS[i % len(ORGAN_COLOURS)], lw=1.1,
                                           marker=".", label=organ)[0]
        if "mean" in curves["val"]:
            x, y = curves["val"]["mean"]
            organ_handles["mean"] = ax.plot(x, 100 * y, color="black", lw=2.4, label="mean")[0]
            ax.set_title(f"{name}: validation Dice (last mean {100 * y[-1]:.1f})", fontsize=10)
        else:
            ax.set_title(f"{name}: validation Dice", fontsize=10)
        ax.set_ylim(0, 100)
        ax.set_xlabel("epoch")
        ax.set_ylabel("Dice (%)")
        ax.grid(alpha=0.3)
        ax = axes[1, col]
        for key, (x, y) in curves["loss"].items():
            ax.plot(x, y, lw=1.2, label=key)
        ax.set_title(f"{name}: training losses (epoch means)", fontsize=10)
        ax.set_xlabel("epoch")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        if curves["loss"]:
            ax.legend(fontsize="x-small")
    if organ_handles:
        fig.legend(list(organ_handles.values()), list(organ_handles), loc="center right", fontsize="small",
                   title="validation Dice")
    fig.tight_layout(rect=(0, 0, 1 - 1.6 / fig.get_figwidth(), 1))
    _save(fig, path)
    return path


# ------------------------------------------------------------------------------------------------ overlay
def _prediction_files(run, cps=None):
    folders = ([os.path.join(run, f"predictions_{cps}")] if cps
               else sorted(glob.glob(os.path.join(run, "predictions_*"))))
    for folder in folders:
        files = sorted(glob.glob(os.path.join(folder, "*.nii.gz")))
        if files:
            return files
    return []


def pick_prediction(runs, case=None, cps=None):
    """(run, prediction path, case id) of the first run holding a prediction (of ``case`` when given)."""
    for run in runs:
        for path in _prediction_files(run, cps):
            case_id = os.path.basename(path)[:-len(".nii.gz")]
            if case is None or case_id == case:
                return run, path, case_id
    return None


def case_dice(gt, pred, num_cls):
    """Per-class Dice x100 of one case (NaN where the class is in neither)."""
    out = np.full(num_cls - 1, np.nan)
    for c in range(1, num_cls):
        g, p = gt == c, pred == c
        denom = g.sum() + p.sum()
        if denom:
            out[c - 1] = 200.0 * np.logical_and(g, p).sum() / denom
    return out


def slice_choice(gt):
    """(axial z, coronal y): the axial slice with the most organs (ties: most foreground), the coronal slice
    through the foreground's centre of mass."""
    d = gt.shape[0]
    counts = [(len(np.unique(gt[z])) - (0 in gt[z]), int((gt[z] > 0).sum())) for z in range(d)]
    z = max(range(d), key=lambda i: counts[i])
    ys = np.nonzero(gt > 0)[1]
    y = int(round(ys.mean())) if ys.size else gt.shape[1] // 2
    return z, y


def _overlay_rgb(image, label, colours, alpha=0.55):
    rgb = np.repeat(np.clip(image, 0, 1)[..., None], 3, axis=-1)
    for c, colour in enumerate(colours, start=1):
        mask = label == c
        if mask.any():
            rgb[mask] = (1 - alpha) * rgb[mask] + alpha * np.asarray(colour)
    return rgb


def plot_overlay(task_name, pred_path, case_id, path, run_name=""):
    """2 x 2 panels: axial and coronal slice, ground truth | prediction, organ legend, per-case Dice."""
    from evaluate_Ntimes import load_gt
    from utils.inference import prepare_case
    from utils.io import read_nifti
    from utils.task import get_task
    task = get_task(task_name)
    image, geometry = prepare_case(task, case_id)
    image = np.asarray(image, dtype=np.float32)
    pred = np.asarray(read_nifti(pred_path)[0]).astype(np.int64)
    gt, _ = load_gt(task, case_id, "auto")
    gt = np.asarray(gt).astype(np.int64)
    if not image.shape == pred.shape == gt.shape:
        raise DataError(f"{pred_path}: prediction {pred.shape}, ground truth {gt.shape} and image {image.shape} "
                        "are on different grids")
    spacing = tuple(geometry.spacing) if hasattr(geometry, "spacing") else (1.0, 1.0, 1.0)  # (x, y, z)
    return draw_overlay(image, gt, pred, spacing, task, f"{run_name} test case {case_id}", path)


def draw_overlay(image, gt, pred, spacing, task, title, path):
    """Axial and coronal slice (rows) of ``gt`` | ``pred`` (columns) over ``image`` (D, H, W); without ``gt`` the
    left column is the plain scan and the legend names the organs found. ``spacing`` (x, y, z) sets the aspect."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import to_rgb
    from matplotlib.patches import Patch

    lo, hi = float(image.min()), float(image.max())
    image = (image - lo) / (hi - lo) if hi > lo else np.zeros_like(image)
    names = task.class_names
    colours = [to_rgb(ORGAN_COLOURS[i % len(ORGAN_COLOURS)]) for i in range(len(names))]
    z, y = slice_choice(pred if gt is None else gt)
    fig, axes = plt.subplots(2, 2, figsize=(11, 9.5))
    views = (("axial", lambda a: a[z], spacing[1] / spacing[0], "upper", f"z = {z}"),
             ("coronal", lambda a: a[:, y, :], spacing[2] / spacing[0], "lower", f"y = {y}"))
    left = ("scan", np.zeros_like(pred)) if gt is None else ("ground truth", gt)
    for row, (view, cut, aspect, origin, where) in enumerate(views):
        for col, (panel, label) in enumerate((left, ("prediction", pred))):
            ax = axes[row, col]
            ax.imshow(_overlay_rgb(cut(image), cut(label), colours), aspect=aspect, origin=origin,
                      interpolation="nearest")
            ax.set_title(f"{view} ({where}): {panel}", fontsize=10)
            ax.set_axis_off()
    if gt is None:
        found = np.bincount(pred.ravel(), minlength=task.num_cls)[1:] > 0
        handles = [Patch(color=colours[i], label=n) for i, n in enumerate(names) if found[i]]
        fig.legend(handles=handles, loc="center right", fontsize="small", title="organ (predicted)")
        fig.suptitle(f"{title}: {int(found.sum())} organs predicted", fontsize=12)
    else:
        dice = case_dice(gt, pred, task.num_cls)
        handles = [Patch(color=colours[i], label=f"{n}  {'-' if np.isnan(dice[i]) else f'{dice[i]:.0f}'}")
                   for i, n in enumerate(names)]
        fig.legend(handles=handles, loc="center right", fontsize="small", title="organ  Dice (this case)")
        mean = np.nanmean(dice) if np.isfinite(dice).any() else float("nan")
        fig.suptitle(f"{title}: mean Dice {mean:.1f}", fontsize=12)
    fig.tight_layout(rect=(0, 0, 0.8, 0.97))
    _save(fig, path)
    return path


def plot_scan(task_name, scan_path, pred_path, out, label_path=None):
    """``<out>/overlay_<scan name>.png`` of a raw scan with predict.py's labels on its own grid (and the ground
    truth beside them with per-organ Dice when ``label_path`` is given); the scan is shown in the task's CT window."""
    from data.transforms import normalize_intensity
    from utils.io import read_nifti
    from utils.task import get_task
    task = get_task(task_name)
    scan, itk = read_nifti(scan_path)
    pred = np.asarray(read_nifti(pred_path)[0]).astype(np.int64)
    gt = None if label_path is None else np.asarray(read_nifti(label_path)[0]).astype(np.int64)
    for path, array in ((pred_path, pred), (label_path, gt)):
        if array is not None and array.shape != scan.shape:
            raise DataError(f"{path}: shape {list(array.shape)} is not the scan's {list(scan.shape)} "
                            f"({scan_path}); predict.py writes labels on the scan's grid")
    name = os.path.basename(scan_path).split(".nii")[0]
    os.makedirs(out, exist_ok=True)
    return draw_overlay(normalize_intensity(scan, task.window), gt, pred, itk.GetSpacing(), task, name,
                        os.path.join(out, f"overlay_{name}.png"))


# ------------------------------------------------------------------------------------------------ bars
def plot_dice_bars(folder, path):
    results = os.path.join(folder, "results.json")
    if not os.path.isfile(results):
        return None
    import make_table
    rows = make_table.load_results([results], [os.path.basename(folder)])
    make_table.plot_bars(make_table.table_cells(rows, "paper"), rows[0][1]["class_names"], path)
    return path


def _save(fig, path):
    import matplotlib.pyplot as plt
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def plot_run(exp, out=None, case=None, cps=None):
    """Write the figures of ``exp``; return {kind: path} of those written."""
    folder = resolve_folder(exp)
    runs = find_runs(folder)
    if not runs and not os.path.isfile(os.path.join(folder, "results.json")):
        raise DataError(f"{folder}: neither a run folder (run.json, train.log) nor one holding runs")
    out = out or os.path.join(folder, "figures")
    os.makedirs(out, exist_ok=True)
    written = {}
    picked = pick_prediction(runs, case, cps)
    if picked is None:
        if case is not None:
            raise DataError(f"{folder}: no prediction of case {case} (run test.py first)")
        log.info("overlay: skipped, no predictions_*/ in %s (run test.py first)", folder)
    else:
        run, pred_path, case_id = picked
        task = run_info(run).get("task")
        if task is None:
            raise DataError(f"{os.path.join(run, 'run.json')}: missing or without 'task'; cannot find the images")
        written["overlay"] = plot_overlay(task, pred_path, case_id, os.path.join(out, f"overlay_{case_id}.png"),
                                          os.path.relpath(run, os.path.dirname(folder)))
    curves = plot_curves(runs, os.path.join(out, "curves.png")) if runs else None
    if curves:
        written["curves"] = curves
    else:
        log.info("curves: skipped, no TensorBoard events or train.log lines in %s", folder)
    bars = plot_dice_bars(folder, os.path.join(out, "dice_bars.png"))
    if bars:
        written["dice_bars"] = bars
    else:
        log.info("dice bars: skipped, no results.json in %s (run evaluate_Ntimes.py first)", folder)
    return written


@cli_main
def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.scan is not None:
        written = {"overlay": plot_scan(args.task, args.scan, args.pred, args.out, args.label)}
    else:
        written = plot_run(args.exp, args.out, args.case, args.cps)
    for kind, path in written.items():
        print(f"{kind}: {path}")


if __name__ == "__main__":
    sys.exit(main())
