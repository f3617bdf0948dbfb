"""Per-class Dice / ASD of a run's test predictions over folds -> ``logs/<exp>/evaluation_res.txt``.

See docs/pipeline.md#evaluation; quirks Q45-Q52 (docs/original-quirks.md). Usage, from the repository root:
    python code/evaluate_Ntimes.py --task synapse --exp Task_synapse_20p/dhc --folds 3 --cps AB

Faithful by default: paper conventions (both empty -> Dice 1 / ASD 0, Q45; one-sided empty -> 0 / 128, Q46),
directed ASD in voxels on the evaluation grid (Q47), GT halved in-plane for Synapse (Q49), ± = np.std over
folds (Q52), the original's file and stdout format. Fixes: AMOS GT is resized to the (80,160,160) grid of the
predictions, not (72,144,144) (Q48, crashed); a newline ends each fold's separator (Q51); ``--gt npy`` reads
the preprocessed labels instead of the raw ones (Q50); ``--both-empty 100|exclude`` corrects Q45. A raw label must
lie on its image's grid (utils/geometry.py; one stored in another orientation is re-indexed; docs/pipeline.md).
Beside the original's text file: results.csv, results.json and evaluation_res.md, which also report the standard
metrics (Dice with both-empty pairs excluded, symmetric ASSD in mm).
"""
import argparse
import csv
import io
import json
import logging
import os
import sys
import warnings

import numpy as np
from tqdm import tqdm

from data.dataset import load_npy
from data.transforms import halve_inplane_label, prepare_label, resize_label
from utils.geometry import Grid, align_label
from utils.inference import raw_image_candidates
from utils.io import (ConfigError, DataError, cli_main, exp_dir, read_list, read_nifti, read_nifti_header, write_json,
                      write_text)
from utils.metrics import BOTH_EMPTY_MODES, N_GT, N_PRED, class_stats, paper_values, standard_values
from utils.task import get_task

log = logging.getLogger("evaluate")

SEPARATOR = "=" * 33
GT_MODES = ("auto", "raw", "npy")
PAPER_NOTE = {
    "paper": "both empty -> Dice 1 (not 100), ASD 0 (as the paper, Q45)",
    "100": "both empty -> Dice 100, ASD 0 (corrected Q45)",
    "exclude": "both-empty pairs excluded from every mean (corrected Q45)",
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Per-class Dice/ASD over folds (original evaluate_Ntimes.py).")
    p.add_argument("--task", default="synapse", help="synapse | amos | phantom")
    p.add_argument("--exp", default="fully", help="experiment folder under logs/, without /fold<k>")
    p.add_argument("--folds", type=int, default=3, help="evaluate logs/<exp>/fold1..fold<N>")
    p.add_argument("--cps", default=None, help="prediction folder suffix: predictions_<cps> (default None)")
    p.add_argument("--gt", choices=GT_MODES, default="auto",
                   help="ground truth: raw NIfTI labels (original), preprocessed npy, or raw if present (auto)")
    p.add_argument("--both-empty", choices=BOTH_EMPTY_MODES, default="paper",
                   help="class absent from prediction and GT: paper = Dice 1/ASD 0 (Q45), 100, or exclude")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------------ loading

def raw_label_candidates(task, case_id):
    """Where the raw label of a case may be: Synapse labelsTr or BTCV Training/label (Q20); AMOS labelsVa
    (the test split is the official validation set, Q50), else labelsTr."""
    if task.raw_layout == "amos":
        return [os.path.join(task.raw_dir, sub, f"{case_id}.nii.gz") for sub in ("labelsVa", "labelsTr")]
    return [os.path.join(task.raw_dir, "labelsTr", f"label{case_id}.nii.gz"),
            os.path.join(task.raw_dir, "Training", "label", f"label{case_id}.nii.gz")]


def npy_label_path(task, case_id):
    return os.path.join(task.npy_dir, f"{case_id}_label.npy")


def to_label_map(array, path, num_cls):
    """Any int/float array of class ids -> uint8/int64 label map; non-integers or ids >= num_cls -> DataError."""
    array = np.asarray(array)
    if array.dtype.kind == "f":
        rounded = np.rint(array)
        if not np.array_equal(rounded, array):
            raise DataError(f"{path}: label map has non-integer values")
        array = rounded
    lo, hi = (array.min(), array.max()) if array.size else (0, 0)
    if lo < 0 or hi >= num_cls:
        raise DataError(f"{path}: label values {int(lo)}..{int(hi)} outside 0..{num_cls - 1}")
    return array.astype(np.uint8 if num_cls <= 256 else np.int64, copy=False)


def load_gt(task, case_id, mode):
    """(label map on the evaluation grid, source path). raw: the original's resize per task;
    npy: the preprocessed label through the training pipeline (prepare_label)."""
    raw = next((p for p in raw_label_candidates(task, case_id) if os.path.isfile(p)), None)
    if mode == "raw" or (mode == "auto" and raw is not None):
        if raw is None:
            tried = " or ".join(raw_label_candidates(task, case_id))
            raise DataError(f"{tried}: raw label of test case {case_id} not found (try --gt npy)")
        array, itk = read_nifti(raw)
        label = to_label_map(align_to_image(task, case_id, array, itk, raw), raw, task.num_cls)
        if task.inplane_halving:
            label = halve_inplane_label(label)
        if task.fixed_grid is not None:  # Q48: the predictions' grid, not the original's (72,144,144)
            label = resize_label(label, task.fixed_grid)
        return label, raw
    path = npy_label_path(task, case_id)
    if not os.path.isfile(path):
        also = " (nor a raw label: " + ", ".join(raw_label_candidates(task, case_id)) + ")" if mode == "auto" else ""
        raise DataError(f"{path}: preprocessed label of test case {case_id} not found{also}")
    stored = to_label_map(load_npy(path), path, task.num_cls)  # checked as stored: 1.5 is not rounded to 2
    if stored.ndim != 3:
        raise DataError(f"{path}: expected a 3-D (D, H, W) label volume, got shape {stored.shape}")
    return prepare_label(stored, task), path


def image_grid(task, case_id):
    """(grid of the image a test case was preprocessed from, where it came from): its ``<id>_meta.json``, else its
    raw NIfTI header, else (None, None)."""
    meta_path = os.path.join(task.npy_dir, f"{case_id}_meta.json")
    if os.path.isfile(meta_path):
        try:
            with open(meta_path) as f:
                return Grid.of_meta(json.load(f)), meta_path
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise DataError(f"{meta_path}: unreadable meta.json ({type(e).__name__}: {e})") from None
    for path in raw_image_candidates(task, case_id):
        if os.path.isfile(path):
            return Grid.of_image(read_nifti_header(path)), path
    return None, None


def align_to_image(task, case_id, label, itk, label_path):
    """A raw label on the grid of its image (utils/geometry.py): as it is, re-indexed when stored in another
    orientation over the same voxels (logged), DataError when the two do not overlay; unchecked (logged) when
    neither meta.json nor the raw image is there."""
    grid, source = image_grid(task, case_id)
    if grid is None:
        log.warning("%s: no %s_meta.json or raw image to check the label's geometry against", label_path, case_id)
        return label
    if label.ndim != 3:
        raise DataError(f"{label_path}: expected a 3-D label volume, got shape {label.shape}")
    label, note = align_label(label, Grid.of_image(itk), grid, label_path, source)
    if note:
        log.warning("%s", note)
    return label


def prediction_path(exp, fold, cps, case_id):
    return os.path.join(exp_dir(exp), f"fold{fold}", f"predictions_{cps}", f"{case_id}.nii.gz")


def load_prediction(path, num_cls):
    """(label map, spacing in array order (D, H, W) from the header)."""
    array, image = read_nifti(path)
    return to_label_map(array, path, num_cls), tuple(image.GetSpacing())[::-1]


def collect_stats(task, exp, folds, cps, gt_mode="auto", progress=True):
    """Raw class statistics [folds, cases, C-1, 5] (utils.metrics.class_stats), test ids, GT source per case.

    GT is loaded once per case and reused for every fold (the original reloaded it per fold)."""
    ids = read_list(task.split_path("test"))
    stats = np.zeros((folds, len(ids), task.num_cls - 1, 5))
    sources = {}
    # None: a bar only on a terminal (no carriage returns in redirected logs)
    with tqdm(total=folds * len(ids), desc="evaluating", unit="case", disable=None if progress else True) as bar:
        for j, case_id in enumerate(ids):
            gt, sources[case_id] = load_gt(task, case_id, gt_mode)
            for k in range(folds):
                path = prediction_path(exp, k + 1, cps, case_id)
                pred, spacing = load_prediction(path, task.num_cls)
                if pred.shape != gt.shape:
                    raise DataError(f"{path}: prediction shape {pred.shape} does not match ground truth "
                                    f"{sources[case_id]} of shape {gt.shape} on the evaluation grid")
                stats[k, j] = class_stats(pred, gt, task.num_cls, spacing)
                bar.update()
    return stats, ids, sources


# ---------------------------------------------------------------------------------------------- reduction

def _mean(a, axis):
    """np.mean, or nanmean when excluded (NaN) entries are present (all-NaN slices stay NaN)."""
    if not np.isnan(a).any():
        return np.mean(a, axis=axis)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(a, axis=axis)


def _std(a, axis):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.std(a, axis=axis) if not np.isnan(a).any() else np.nanstd(a, axis=axis)


def reduce_folds(values):
    """values [folds, cases, classes, 2] -> every summary of docs/pipeline.md#evaluation, in the original's order of
    means.

    Per fold: per-class mean over cases and their mean over classes ("Average"). Across folds: R = mean over
    folds [cases, classes, 2]; final per class = mean over cases of R; final average = its mean over classes;
    ± = np.std (ddof 0) over folds of each fold's case-and-class mean (Q52)."""
    fold_class = _mean(values, 1)
    fold_avg = _mean(fold_class, 1)
    case_class = _mean(values, 0)
    final_class = _mean(case_class, 0)
    return {"fold_class": fold_class, "fold_avg": fold_avg, "case_class": case_class,
            "case_avg": _mean(case_class, 1), "final_class": final_class, "final_avg": _mean(final_class, 0),
            "final_std": _std(fold_avg, 0), "class_std": _std(fold_class, 0)}


# ---------------------------------------------------------------------------------------------- rendering

def _arr(a):
    """numpy's default array str (line width 75), independent of any global print options."""
    with np.printoptions(precision=8, threshold=1000, edgeitems=3, linewidth=75, suppress=False,
                         nanstr="nan", infstr="inf", sign="-", floatmode="maxprec", legacy=False):
        return str(a)


def fold_lines(red, k):
    """The original's per-fold block (file); each value rendered with the original's expression."""
    fc, fa = red["fold_class"][k], red["fold_avg"][k]
    return [f"Fold{k + 1}", "------ Dice ------", _arr(np.round(fc[:, 0], 1)), "------ ASD ------",
            _arr(np.round(fc[:, 1], 1)), f"Average Dice:{fa[0]}", f"Average  ASD:{fa[1]}", SEPARATOR]


def final_lines(red):
    fc, avg, std = red["final_class"], red["final_avg"], red["final_std"]
    return ["Final Dice of each class", str([round(x, 1) for x in fc[:, 0].tolist()]),
            "Final ASD of each class", str([round(x, 1) for x in fc[:, 1].tolist()]),
            f"Final Avg Dice: {round(avg[0], 2)}±{round(std[0], 2)}",  # numpy scalars: np.round semantics
            f"Final Avg  ASD: {round(avg[1], 2)}±{round(std[1], 2)}"]


def render_txt(red, ids, both_empty="paper"):
    """evaluation_res.txt as the original writes it, plus the newline after each fold separator (Q51)."""
    folds = ["\n".join(fold_lines(red, k)) for k in range(len(red["fold_avg"]))]
    lines = ["\n".join(folds) + "\n\n", "All folds"]
    for i, case_id in enumerate(ids):
        cc, ca = red["case_class"][i], red["case_avg"][i]
        lines += [f"===== Case-{case_id}", f"\tDice:{np.round(cc[:, 0], 2).tolist()}",
                  f"\t ASD:{np.round(cc[:, 1], 2).tolist()}", f"\tAverage Dice:{ca[0]}", f"\tAverage  ASD:{ca[1]}"]
    lines += [SEPARATOR] + final_lines(red)
    if both_empty != "paper":  # an extra last line, so the original lines stay parseable
        lines.append(f"Both-empty convention: {PAPER_NOTE[both_empty]}")
    return "\n".join(lines) + "\n"


def render_stdout(red):
    """What the original prints after ``\\n Evaluating...``."""
    lines = []
    for k, (fc, fa) in enumerate(zip(red["fold_class"], red["fold_avg"])):
        lines += [f"Fold {k + 1}", "------ Dice ------", _arr(np.round(fc[:, 0], 1)), "------ ASD ------",
                  _arr(np.round(fc[:, 1], 1)), f"{fa[0]} {fa[1]}"]
    return "\n".join(lines + [SEPARATOR] + final_lines(red))


def _num(x):
    """JSON-safe float (NaN -> null)."""
    x = float(x)
    return None if np.isnan(x) else x


def _summary(red, col):
    tolist = lambda a: [_num(v) for v in a]  # noqa: E731
    return {"class_mean": tolist(red["final_class"][:, col]), "class_std": tolist(red["class_std"][:, col]),
            "mean": _num(red["final_avg"][col]), "std": _num(red["final_std"][col]),
            "fold_class": [tolist(f) for f in red["fold_class"][:, :, col]],
            "fold_mean": tolist(red["fold_avg"][:, col]),
            "case_mean": tolist(red["case_avg"][:, col])}


def render_json(meta, paper, standard):
    return dict(meta, paper={"convention": PAPER_NOTE[meta["both_empty"]] + "; one-sided empty -> Dice 0, "
                             "ASD 128 (Q46); ASD = directed pred->GT mean surface distance in voxels (Q47)",
                             "dice": _summary(paper, 0), "asd": _summary(paper, 1)},
                standard={"convention": "Dice with both-empty pairs excluded; ASSD = symmetric mean surface "
                          "distance in mm (prediction header spacing), pairs with both masks non-empty",
                          "dice": _summary(standard, 0), "assd_mm": _summary(standard, 1)})


def render_csv(stats, values, std_values, ids, class_names):
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow(["fold", "case", "class_id", "class_name", "dice", "asd", "assd_mm", "pred_voxels", "gt_voxels"])
    for k in range(stats.shape[0]):
        for j, case_id in enumerate(ids):
            for c, name in enumerate(class_names):
                dice, asd = values[k, j, c]
                w.writerow([k + 1, case_id, c + 1, name, repr(float(dice)), repr(float(asd)),
                            repr(float(std_values[k, j, c, 1])), int(stats[k, j, c, N_PRED]),
                            int(stats[k, j, c, N_GT])])
    return out.getvalue()


def _pm(mean, std, digits):
    return "n/a" if np.isnan(mean) else f"{mean:.{digits}f} ± {std:.{digits}f}"


def render_markdown(meta, paper, standard, class_names):
    head = [f"# Evaluation of `{meta['exp']}`", "",
            f"Task `{meta['task']}`, {meta['folds']} fold(s), `predictions_{meta['cps']}`, "
            f"{len(meta['ids'])} test case(s), ground truth: {meta['gt_summary']}. "
            "Mean ± std over folds (np.std, ddof 0, of each fold's mean; Q52).", "",
            "| organ | Dice (paper) | ASD (paper, voxels) | Dice (standard) | ASSD (standard, mm) |",
            "|---|---|---|---|---|"]
    rows = []
    for c, name in enumerate(class_names):
        cells = [_pm(r["final_class"][c, i], r["class_std"][c, i], 2) for r in (paper, standard) for i in (0, 1)]
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    cells = [_pm(r["final_avg"][i], r["final_std"][i], 2) for r in (paper, standard) for i in (0, 1)]
    rows.append("| **Average** | " + " | ".join(f"**{c}**" for c in cells) + " |")
    notes = ["", f"- Paper metrics (as `evaluation_res.txt`): Dice x100; {PAPER_NOTE[meta['both_empty']]}; "
             "one-sided empty -> Dice 0, ASD 128 (Q46); ASD = directed prediction->GT mean surface distance in "
             "voxels of the evaluation grid, no spacing (Q47).",
             "- Standard metrics: Dice x100 over pairs where prediction or GT is non-empty (both-empty pairs "
             "excluded); ASSD = symmetric average surface distance in mm using the prediction header spacing "
             "(the inference grid), over pairs where both are non-empty."]
    return "\n".join(head + rows + notes) + "\n"


# ---------------------------------------------------------------------------------------------- entry point

def evaluate(task, exp, folds=3, cps=None, gt="auto", both_empty="paper", progress=True):
    """Compute everything; returns the rendered outputs (nothing written yet) and the summaries."""
    if folds < 1:
        raise ConfigError(f"--folds must be >= 1, got {folds}")
    stats, ids, sources = collect_stats(task, exp, folds, cps, gt, progress)
    return summarize(task, exp, stats, ids, cps, sources, gt, both_empty)


def summarize(task, exp, stats, ids, cps, sources=None, gt="auto", both_empty="paper"):
    """Everything ``evaluate`` returns, from raw class statistics [folds, cases, C-1, 5] already collected (by
    ``collect_stats``, or kept from earlier runs as the phantom benchmark's run records are). ``sources``: the ground
    truth file per case, None when not known."""
    values, std_values = paper_values(stats, both_empty), standard_values(stats)
    paper, standard = reduce_folds(values), reduce_folds(std_values)
    if sources is None:
        summary = "not recorded (statistics kept from earlier runs)"
    else:
        n_raw = sum(not p.endswith(".npy") for p in sources.values())
        summary = f"{n_raw} raw NIfTI, {len(ids) - n_raw} preprocessed npy"
    meta = {"task": task.name, "exp": exp, "folds": int(stats.shape[0]), "cps": str(cps), "ids": list(ids),
            "class_names": list(task.class_names), "both_empty": both_empty, "gt_mode": gt,
            "gt_sources": sources, "gt_summary": summary}
    log.info("ground truth: %s (--gt %s)", meta["gt_summary"], gt)
    return {"meta": meta, "stats": stats, "values": values, "paper": paper, "standard": standard,
            "files": {"evaluation_res.txt": render_txt(paper, ids, both_empty),
                      "results.csv": render_csv(stats, values, std_values, ids, task.class_names),
                      "evaluation_res.md": render_markdown(meta, paper, standard, task.class_names)},
            "json": render_json(meta, paper, standard)}


def write_outputs(result, folder):
    for name, text in result["files"].items():
        write_text(os.path.join(folder, name), text)
    write_json(os.path.join(folder, "results.json"), result["json"])


@cli_main
def main(argv=None, task=None):
    """CLI; ``task`` (a TaskConfig) overrides ``--task`` (tests). Bad input -> ``error: ...``, returns 2."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    task = task if task is not None else get_task(args.task)
    if args.folds < 1:
        raise ConfigError(f"--folds must be >= 1, got {args.folds}")
    print("\n Evaluating...")
    result = evaluate(task, args.exp, args.folds, args.cps, args.gt, args.both_empty, not args.no_progress)
    write_outputs(result, exp_dir(args.exp))
    print(render_stdout(result["paper"]))
    log.info("wrote %s/{evaluation_res.txt,evaluation_res.md,results.csv,results.json} (both-empty: %s)",
             exp_dir(args.exp), args.both_empty)


if __name__ == "__main__":
    sys.exit(main())
