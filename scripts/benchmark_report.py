"""Evaluation, table and figures of the phantom benchmark (``scripts/benchmark.py --report``).

Writes into ``docs/benchmark/``: ``phantom_20p.{md,tex,csv,png}`` (make_table.py: one row per method, mean ± std
over the folds finished so far), ``phantom_20p_curves.png`` (validation mean Dice against iteration, every method)
and ``phantom_20p_organs.png`` (per-organ test Dice against the organ's voxel share: DHC, CPS and both bounds).
``phantom_20p.md`` is the table with the protocol, the commands, the commits, seeds per row and timings around it,
and the hand-written reading of ``phantom_20p_reading.md`` when that file exists.
"""
import os
import re
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [os.path.join(ROOT, "code"), ROOT]
from config import BENCHMARK as P, SYNAPSE_ORGANS  # noqa: E402

VAL_LINE = re.compile(r"validation epoch (\d+): mean dice ([0-9.]+)")
STAMP = re.compile(r"^\[(\d\d):(\d\d):(\d\d)\.\d+\] ")
HIGHLIGHT = ("dhc", "cps", "fully", "fully_all")
STRONG = {"dhc": "black", "cps": "tab:orange", "fully": "tab:gray", "fully_all": "tab:blue"}  # the curves to find


def finished_folds(method, folds):
    """Number k of contiguous finished folds fold1..foldk of a method (evaluate_Ntimes reads fold1..foldk)."""
    by_fold = {f.fold: f for f in folds if f.method == method}
    k = 0
    while k + 1 in by_fold and by_fold[k + 1].trained() and by_fold[k + 1].tested():
        k += 1
    return k


def evaluate(method, k, env):
    exp = f"Task_phantom_{P.label_ratio}p/{method}"
    subprocess.run([sys.executable, "code/evaluate_Ntimes.py", "--task", "phantom", "--exp", exp, "--folds", str(k),
                    "--cps", "AB", "--no-progress"], check=True, env=env, cwd=ROOT, stdout=subprocess.DEVNULL)
    return os.path.join(env["DHC_LOG_ROOT"], exp)


def validation_curve(fold):
    """(iterations, validation mean Dice x100) of one fold's train.log."""
    path = os.path.join(fold.folder, "train.log")
    points = {}
    if os.path.isfile(path):
        for line in open(path, errors="replace"):
            m = VAL_LINE.search(line)
            if m:
                points[(int(m.group(1)) + 1) * fold.per_epoch] = 100 * float(m.group(2))
    it = np.array(sorted(points))
    return it, np.array([points[i] for i in it])


def trained_iterations(fold):
    """(iterations trained, stopped early?) from a fold's train.log: the original's early stop (no validation gain
    for the task's patience in epochs) can end a run before its planned ``fold.iterations``."""
    from benchmark import _lines
    return fold.epochs_done() * fold.per_epoch, any("] early stop:" in line for line in _lines(fold.folder))


def mean_curve(folds):
    """Validation curve averaged over folds (truncated to the shortest); None when no fold has validated yet."""
    curves = [c for c in map(validation_curve, folds) if len(c[0])]
    if not curves:
        return None
    n = min(len(c[0]) for c in curves)
    return curves[0][0][:n], np.mean([c[1][:n] for c in curves], axis=0), len(curves)


def last_quarter(it, dice):
    """(min, max) validation Dice over the last quarter of the iterations: how flat the curve ended."""
    keep = it >= 0.75 * it[-1]
    return float(dice[keep].min()), float(dice[keep].max())


def fold_wall_seconds(fold):
    """Training wall time: first to last time stamp of train.log, pauses and restarts not counted."""
    path = os.path.join(fold.folder, "train.log")
    if not os.path.isfile(path):
        return None
    stamps = [int(m.group(1)) * 3600 + int(m.group(2)) * 60 + int(m.group(3))
              for m in map(STAMP.match, open(path, errors="replace")) if m]
    from benchmark import working_gaps
    steps = [(b - a) % 86400 for a, b in zip(stamps, stamps[1:])]
    return float(sum(working_gaps(steps))) if steps else None


def organ_shares(env):
    """Voxel share (%) of each organ over the training cases' labels."""
    from utils.io import read_list
    from utils.task import get_task
    data = get_task("phantom").data_dir
    counts = np.zeros(len(SYNAPSE_ORGANS) + 1)
    for case in read_list(get_task("phantom").split_path("train")):
        counts += np.bincount(np.load(os.path.join(data, "npy", f"{case}_label.npy")).ravel().astype(np.int64),
                              minlength=len(counts))
    return 100 * counts[1:] / counts.sum()


def confusion(gt, pred, num_cls):
    """Voxel counts [true class, predicted class] of one label-map pair."""
    return np.bincount(gt.astype(np.int64).ravel() * num_cls + pred.astype(np.int64).ravel(),
                       minlength=num_cls * num_cls).reshape(num_cls, num_cls)


def load_test_labels():
    """{test case: ground-truth label map on the evaluation grid}, loaded once for every row and seed."""
    from evaluate_Ntimes import load_gt
    from utils.io import read_list
    from utils.task import get_task
    task = get_task("phantom")
    return {case: load_gt(task, case, "auto")[0] for case in read_list(task.split_path("test"))}


def confusion_on_test_cases(fold, labels):
    """Voxel confusion of a fold's test predictions (``predictions_AB``) against ``labels`` (``load_test_labels()``)."""
    from evaluate_Ntimes import load_prediction
    from utils.task import get_task
    num_cls = get_task("phantom").num_cls
    total = np.zeros((num_cls, num_cls), np.int64)
    for case, gt in labels.items():
        pred, _ = load_prediction(os.path.join(fold.folder, "predictions_AB", f"{case}.nii.gz"), num_cls)
        total += confusion(gt, pred, num_cls)
    return total


def voxel_summary(conf, organ):
    """Where the voxels go, from a confusion matrix (class 0 = background): for ``organ`` (a class index) its
    predicted : true voxel ratio, precision and recall (x100); then the share (x100) of all voxels predicted as an
    organ that are background, and precision and recall (x100) averaged over the organs (precision over the organs
    predicted at all)."""
    conf = np.asarray(conf, float)
    true, predicted, hit = conf.sum(1), conf.sum(0), np.diag(conf)
    with np.errstate(invalid="ignore", divide="ignore"):
        precision, recall = 100 * hit / predicted, 100 * hit / true
    return (predicted[organ] / true[organ], precision[organ], recall[organ],
            100 * conf[0, 1:].sum() / predicted[1:].sum(), np.nanmean(precision[1:]), np.nanmean(recall[1:]))


def plot_curves(methods, folds, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from utils.io import atomic_path
    fig, ax = plt.subplots(figsize=(9, 5.5))
    tab20 = plt.get_cmap("tab20").colors
    others = iter(tab20[4:14] + tab20[16:] + tab20[:4] * 4)  # not the blue, orange and grey of STRONG first
    for m in methods:
        curve = mean_curve([f for f in folds if f.method == m])
        if curve is None:
            continue
        it, dice, n_seeds = curve
        style = dict(lw=2.4) if m in HIGHLIGHT else dict(lw=1.1, alpha=0.85)
        ls = "--" if m in ("fully", "fully_all") else "-"
        ax.plot(it, dice, ls, color=STRONG.get(m) or next(others),
                label=f"{m} ({n_seeds} seed{'s' if n_seeds > 1 else ''})", **style)
    ax.set_xlabel("iteration")
    ax.set_ylabel("validation mean Dice (%), centre crop of the 3 eval cases")
    ax.set_title(f"Phantom {P.label_ratio} % labels: learning curves (mean over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", ncol=2)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def plot_organs(results, shares, path):
    """results: {method: (class Dice means, class stds)}."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from utils.io import atomic_path
    fig, ax = plt.subplots(figsize=(9, 5.5))
    order = np.argsort(shares)
    markers = {"dhc": "o", "cps": "s", "fully": "v", "fully_all": "^"}
    for m in HIGHLIGHT:
        if m not in results:
            continue
        mean, std = results[m]
        ax.errorbar(shares[order], mean[order], yerr=std[order], marker=markers[m], capsize=2, color=STRONG[m],
                    lw=2.2 if m == "dhc" else 1.2, ls="--" if m.startswith("fully") else "-", label=m)
    level, last = 0, None
    for k in order:  # organs of nearly equal share: names stacked, not printed over each other
        level = level + 1 if last is not None and np.log10(shares[k] / last) < 0.05 else 0
        last = shares[k]
        ax.annotate(SYNAPSE_ORGANS[k], (shares[k], 1 + 12 * level), rotation=60, fontsize=7, ha="left",
                    va="bottom")
    ax.set_xscale("log")
    ax.set_xlabel("organ's share of the training voxels (%, log scale)")
    ax.set_ylabel("test Dice (%)")
    ax.set_ylim(0, 100)
    ax.set_title("Per-organ test Dice against organ size (rare organs on the left)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def iterations_cell(folds):
    """The summary's iterations column: each seed's trained count, marked where it stopped early, and the plan."""
    runs = [trained_iterations(f) for f in folds]
    return ", ".join(f"{n}{' (early stop)' if early else ''}" for n, early in runs) + f" of {folds[0].iterations}"


def ranking(results):
    """Methods by mean test Dice over the organs, best first (ties keep their order): the page's row order."""
    return sorted(results, key=lambda m: -float(np.mean(results[m][0])))


def commits(folds):
    found = set()
    for f in folds:
        path = os.path.join(f.folder, "benchmark.log")
        if os.path.isfile(path):
            found.update(re.findall(r"commit ([0-9a-f]{7,40}(?:\+changes)?)", open(path, errors="replace").read()))
    return sorted(found)


def shown_path(path):
    """``path`` relative to the repository when it lies inside it (the page names no machine's folders)."""
    rel = os.path.relpath(os.path.abspath(path), ROOT)
    return path if rel.startswith("..") else rel


def write_report(methods, folds, out, env):
    import json
    from utils.task import get_task
    from make_table import make_table
    from utils.io import write_text
    os.makedirs(out, exist_ok=True)
    prefix = os.path.join(out, f"{P.name}")
    done = {m: finished_folds(m, folds) for m in methods}
    exps = {m: evaluate(m, k, env) for m, k in done.items() if k}
    if not exps:
        print("nothing finished yet: no table")
        return
    results = {}
    for m, folder in exps.items():
        res = json.load(open(os.path.join(folder, "results.json")))["paper"]["dice"]
        results[m] = (np.array(res["class_mean"], float), np.array(res["class_std"], float))
    exps = {m: exps[m] for m in ranking(results)}
    table = make_table([exps[m] for m in exps], prefix, names=list(exps))
    shares = organ_shares(env)
    plot_curves(methods, [f for f in folds if f.trained()], prefix + "_curves.png")
    plot_organs(results, shares, prefix + "_organs.png")
    rare = np.argsort(shares)[:5]
    lines = [f"# Phantom benchmark, {P.label_ratio} % labels: every method under one protocol", "",
             "Written by `make benchmark` (scripts/benchmark.py, scripts/benchmark_report.py, code/make_table.py) "
             "from the runs under `" + shown_path(env["DHC_LOG_ROOT"]) + "`; runs on commit(s) " +
             (", ".join(f"`{c}`" for c in commits(folds)) or "n/a") + ".", "",
             "## Protocol", "", "`config.BENCHMARK`:", "",
             f"- Phantom: {P.n_cases} cases written on a {'x'.join(map(str, P.raw_shape))} grid "
             f"(`code/data/phantom.py --shape`), halved in-plane at load time; splits train 13 / eval 3 / test 4, "
             f"{P.label_ratio} % labels = 2 labeled + 11 unlabeled cases.",
             f"- Every method: `-l {P.base_lr:g} -w {P.cps_w:g} -r`, VNet width {P.n_filters}, patch "
             f"{'x'.join(map(str, P.patch_size))} (UNETR++: {'x'.join(map(str, P.unetrpp_patch_size))} at "
             f"`-l {P.unetrpp_base_lr:g}`), about "
             f"{P.iterations} iterations; the upper bound `fully_all` about {P.bound_iterations}; "
             f"{P.n_evals} validations per run; test by sliding window (A+B ensemble for pairs), "
             "evaluation with the paper's conventions (Dice x100, ASD in voxels).",
             "- One single-threaded process per fold, two folds side by side on the 2-core machine.",
             "- Command: `make benchmark` (or `METHODS=\"dhc cps\" SEEDS=\"0\" make benchmark`).", "",
             "## Results (test cases, mean ± std over seeds; best mean Dice first)", "", table.rstrip(), "",
             "Rarest five organs (by voxel share): " + ", ".join(SYNAPSE_ORGANS[k] for k in rare) + ".", ""]
    lines += ["| method | seeds | mean Dice | organs > 0 | rare-five mean Dice | validation Dice, last quarter "
              "(min–max) | iterations trained (of planned) | s/it | training wall s per seed |",
              "|---|---|---|---|---|---|---|---|---|"]
    from benchmark import seconds_per_iteration
    for m in exps:
        fs = [f for f in folds if f.method == m and f.fold <= done[m]]
        rates = [r for r in map(seconds_per_iteration, fs) if r]
        walls = [w for w in map(fold_wall_seconds, fs) if w]
        curve = mean_curve(fs)
        flat = "{:.1f}–{:.1f}".format(*last_quarter(*curve[:2])) if curve else "n/a"
        lines.append(f"| {m} | {', '.join(str(f.seed) for f in fs)} | {results[m][0].mean():.1f} | "
                     f"{int((results[m][0] > 0).sum())} | "
                     f"{np.mean(results[m][0][rare]):.1f} | {flat} | {iterations_cell(fs)} | "
                     + (f"{np.mean(rates):.2f} | {np.mean(walls):.0f} |" if rates and walls else "n/a | n/a |"))
    liver = SYNAPSE_ORGANS.index("liver") + 1
    lines += ["", "Where the voxels go (test cases, voxels summed over the seeds): the liver's predicted ÷ true "
              "volume, precision and recall; the share of voxels predicted as an organ that are background; "
              "precision and recall averaged over the organs (precision over those predicted at all).", "",
              "| method | liver predicted ÷ true | liver precision | liver recall | organ voxels on background % | "
              "organ precision | organ recall |", "|---|---|---|---|---|---|---|"]
    labels = load_test_labels()
    for m in exps:
        conf = sum(confusion_on_test_cases(f, labels) for f in folds if f.method == m and f.fold <= done[m])
        ratio, *rest = voxel_summary(conf, liver)
        lines.append(f"| {m} | {ratio:.2f} | " + " | ".join(f"{v:.1f}" for v in rest) + " |")
    left = [f"{f.method} seed {f.seed}" for f in folds if not (f.trained() and f.tested())]
    lines += ["", "Not yet run: " + (", ".join(left) if left else "nothing") + ".", "",
              f"![learning curves]({P.name}_curves.png)", "", f"![per-organ Dice]({P.name}_organs.png)", "",
              f"![per-class Dice]({P.name}.png)", ""]
    reading = prefix + "_reading.md"
    if os.path.isfile(reading):
        lines += [open(reading).read().rstrip(), ""]
    write_text(prefix + ".md", "\n".join(lines))
    print(f"wrote {prefix}.{{md,tex,csv,png}}, {prefix}_curves.png, {prefix}_organs.png")
