"""Run records, evaluation, table and figures of the phantom benchmark (``scripts/benchmark.py``).

A fold (one row, one seed) that is trained and tested is summed up in a run record,
``docs/benchmark/runs/<method>_seed<seed>.json``: the protocol it ran under, its commands and commits, iterations,
timing, validation curve, and the raw class statistics and voxel confusion of its test predictions. Records are
committed, so the comparison outlives the machine that trained it (checkpoints and predictions do not travel); the
page is written from records only. From them ``write_report`` writes into ``docs/benchmark/``:
``phantom_20p.{md,tex,csv,png}`` (make_table.py: one row per method, mean ± std over the seeds recorded),
``phantom_20p_curves.png`` (validation mean Dice against iteration, every method) and ``phantom_20p_organs.png``
(per-organ test Dice against the organ's voxel share: DHC, CPS and both bounds). ``phantom_20p.md`` is the table with
the protocol, the commands, the commits, seeds per row and timings around it, and the hand-written reading of
``phantom_20p_reading.md`` when that file exists.
"""
import glob
import json
import os
import re
import sys
from dataclasses import asdict

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [os.path.join(ROOT, "code"), ROOT]
from config import BENCHMARK as P, SYNAPSE_ORGANS  # noqa: E402

VAL_LINE = re.compile(r"validation epoch (\d+): mean dice ([0-9.]+)")
STAMP = re.compile(r"^\[(\d\d):(\d\d):(\d\d)\.\d+\] ")
HIGHLIGHT = ("dhc", "cps", "fully", "fully_all")
STRONG = {"dhc": "black", "cps": "tab:orange", "fully": "tab:gray", "fully_all": "tab:blue"}  # the curves to find


RECORD_VERSION = 1
NOT_PROTOCOL = ("name", "raw_dir", "data_dir", "log_root", "seeds")  # where and how often, not what a run did
STAT_COLUMNS = ["pred_voxels", "gt_voxels", "dice", "asd_vox", "assd_mm"]  # utils.metrics.class_stats


def protocol():
    """The parts of ``config.BENCHMARK`` that decide a run's result, as a record stores them."""
    fields = {k: v for k, v in asdict(P).items() if k not in NOT_PROTOCOL}
    return json.loads(json.dumps(fields))  # tuples -> lists, as they come back from a record


def _nan_to_none(a):
    return [_nan_to_none(v) for v in a] if isinstance(a, (list, np.ndarray)) else \
        (None if np.isnan(a) else float(a))


def machine():
    """What the timing was measured on: CPU model, cores, torch and Python versions."""
    import platform
    import torch
    cpu = platform.processor() or "unknown CPU"
    if os.path.isfile("/proc/cpuinfo"):
        cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
                   cpu)
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version()}


def fold_record(fold, labels):
    """The run record of a trained and tested fold (``labels``: ``load_test_labels()``)."""
    from benchmark import seconds_per_iteration
    from utils.task import get_task
    stats, conf = test_statistics(fold, labels)
    it, dice = validation_curve(fold)
    trained, early = trained_iterations(fold)
    return {"version": RECORD_VERSION, "method": fold.method, "seed": fold.seed, "protocol": protocol(),
            "commits": fold_commits(fold), "commands": fold_commands(fold),
            "iterations": {"per_epoch": fold.per_epoch, "planned": fold.iterations, "trained": trained,
                           "early_stop": early},
            "seconds_per_iteration": seconds_per_iteration(fold), "wall_seconds": fold_wall_seconds(fold),
            "machine": machine(),
            "validation": [[int(i), round(float(d), 4)] for i, d in zip(it, dice)],
            "test": {"cps": "AB", "ids": list(labels), "class_names": list(get_task("phantom").class_names),
                     "stat_columns": STAT_COLUMNS, "stats": _nan_to_none(stats), "confusion": conf.tolist()}}


def write_record(fold, labels=None):
    """Write ``fold.record`` (under a temporary name, then renamed)."""
    from utils.io import write_json
    write_json(fold.record, fold_record(fold, load_test_labels() if labels is None else labels))


def read_record(path):
    """A run record as a dict; an unreadable or foreign file is a DataError naming it."""
    from utils.io import DataError
    try:
        with open(path) as f:
            rec = json.load(f)
        ok = rec.get("version") == RECORD_VERSION and all(k in rec for k in ("method", "seed", "protocol", "test"))
    except (OSError, ValueError, AttributeError) as e:
        raise DataError(f"{path}: unreadable run record ({e})") from None
    if not ok:
        raise DataError(f"{path}: not a run record of version {RECORD_VERSION}")
    return rec


def protocol_changes(rec):
    """The protocol fields in which a record differs from ``config.BENCHMARK`` (empty: it counts)."""
    mine = protocol()
    return sorted(k for k in set(mine) | set(rec["protocol"]) if rec["protocol"].get(k) != mine.get(k))


def load_records(runs):
    """{method: [run record, ...] in the protocol's seed order} of every record in ``runs``. A record made under
    another protocol is left out with one line naming it; an unreadable one is an error."""
    found = {}
    for path in sorted(glob.glob(os.path.join(runs, "*.json"))):
        rec = read_record(path)
        changed = protocol_changes(rec)
        if changed:
            print(f"left out {path}: recorded under another protocol ({', '.join(changed)} differ)")
            continue
        found.setdefault(rec["method"], []).append(rec)
    order = lambda r: (P.seeds.index(r["seed"]) if r["seed"] in P.seeds else len(P.seeds), r["seed"])  # noqa: E731
    return {m: sorted(recs, key=order) for m, recs in found.items()}


def method_results(method, records):
    """A row's evaluation over its recorded seeds, as evaluate_Ntimes.py's results.json (paper and standard)."""
    from evaluate_Ntimes import summarize
    from utils.io import DataError
    from utils.task import get_task
    task = get_task("phantom")
    ids = records[0]["test"]["ids"]
    for r in records:
        if r["test"]["ids"] != ids or r["test"]["class_names"] != list(task.class_names):
            raise DataError(f"run records of {method}: seed {r['seed']} has other test cases or classes than seed "
                            f"{records[0]['seed']}")
    stats = np.array([r["test"]["stats"] for r in records], dtype=float)  # None -> NaN
    return summarize(task, f"Task_phantom_{P.label_ratio}p/{method}", stats, ids, "AB")["json"]


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


def mean_curve(curves):
    """Validation curves [(iterations, Dice)] averaged over seeds (truncated to the shortest); None when no seed
    has validated yet."""
    curves = [(np.asarray(i), np.asarray(d, float)) for i, d in curves if len(i)]
    if not curves:
        return None
    n = min(len(c[0]) for c in curves)
    return curves[0][0][:n], np.mean([c[1][:n] for c in curves], axis=0), len(curves)


def record_curve(record):
    points = np.array(record["validation"], float).reshape(-1, 2)
    return points[:, 0].astype(int), points[:, 1]


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


def organ_shares():
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


def test_statistics(fold, labels):
    """Raw class statistics [cases, C-1, 5] (utils.metrics.class_stats, as evaluate_Ntimes.py collects them) and the
    voxel confusion of a fold's test predictions (``predictions_AB``) against ``labels`` (``load_test_labels()``)."""
    from evaluate_Ntimes import load_prediction
    from utils.metrics import class_stats
    from utils.io import DataError
    from utils.task import get_task
    num_cls = get_task("phantom").num_cls
    stats, total = [], np.zeros((num_cls, num_cls), np.int64)
    for case, gt in labels.items():
        path = os.path.join(fold.folder, "predictions_AB", f"{case}.nii.gz")
        pred, spacing = load_prediction(path, num_cls)
        if pred.shape != gt.shape:
            raise DataError(f"{path}: prediction shape {pred.shape} differs from the ground truth's {gt.shape}")
        stats.append(class_stats(pred, gt, num_cls, spacing))
        total += confusion(gt, pred, num_cls)
    return np.array(stats), total


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


def plot_curves(records, path):
    """records: {method: [run record, ...]}."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from utils.io import atomic_path
    fig, ax = plt.subplots(figsize=(9, 5.5))
    tab20 = plt.get_cmap("tab20").colors
    others = iter(tab20[4:14] + tab20[16:] + tab20[:4] * 4)  # not the blue, orange and grey of STRONG first
    for m, recs in records.items():
        curve = mean_curve([record_curve(r) for r in recs])
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
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def iterations_cell(records):
    """The summary's iterations column: each seed's trained count, marked where it stopped early, and the plan."""
    runs = [r["iterations"] for r in records]
    return ", ".join(f"{n['trained']}{' (early stop)' if n['early_stop'] else ''}" for n in runs) + \
        f" of {runs[0]['planned']}"


def ranking(results):
    """Methods by mean test Dice over the organs, best first (ties keep their order): the page's row order."""
    return sorted(results, key=lambda m: -float(np.mean(results[m][0])))


def _benchmark_log(fold):
    path = os.path.join(fold.folder, "benchmark.log")
    return open(path, errors="replace").read() if os.path.isfile(path) else ""


def fold_commits(fold):
    """The commits a fold's commands ran on (its benchmark.log), in order of first use."""
    found = re.findall(r"commit ([0-9a-f]{7,40}(?:\+changes)?)", _benchmark_log(fold))
    return list(dict.fromkeys(found))


def fold_commands(fold):
    """The train and test command lines a fold ran (its benchmark.log), without the machine's folders: ``python
    code/train_dhc.py ...``."""
    lines = [line[2:] for line in _benchmark_log(fold).splitlines() if line.startswith("# ") and " commit " not in line]
    return [re.sub(r"^\S*python\S*", "python", re.sub(r"\S*/(code/\S+\.py)", r"\1", line)) for line in lines]


def shown_path(path):
    """``path`` relative to the repository when it lies inside it (the page names no machine's folders)."""
    rel = os.path.relpath(os.path.abspath(path), ROOT)
    return path if rel.startswith("..") else rel


def write_report(methods, folds, out, runs):
    """The page and its figures in ``out`` from the run records in ``runs`` (rows of ``methods`` only; ``folds``:
    the runner's plan, for the "not yet run" line)."""
    from utils.io import write_text
    from make_table import write_tables
    os.makedirs(out, exist_ok=True)
    prefix = os.path.join(out, f"{P.name}")
    records = {m: recs for m, recs in load_records(runs).items() if m in methods}
    if not records:
        print("nothing recorded yet: no table")
        return
    evaluated = {m: method_results(m, recs) for m, recs in records.items()}
    results = {m: (np.array(res["paper"]["dice"]["class_mean"], float),
                   np.array(res["paper"]["dice"]["class_std"], float)) for m, res in evaluated.items()}
    records = {m: records[m] for m in ranking(results)}
    table = write_tables([(m, evaluated[m]) for m in records], prefix)
    shares = organ_shares()
    plot_curves(records, prefix + "_curves.png")
    plot_organs(results, shares, prefix + "_organs.png")
    rare = np.argsort(shares)[:5]
    commits = list(dict.fromkeys(c for recs in records.values() for r in recs for c in r["commits"]))
    lines = [f"# Phantom benchmark, {P.label_ratio} % labels: every method under one protocol", "",
             "Written by `make benchmark` (scripts/benchmark.py, scripts/benchmark_report.py, code/make_table.py) "
             "from the run records in `" + shown_path(runs) + "` (one per row and seed, written when the run "
             "finished: its commands, iterations, timing, validation curve and test statistics); runs on "
             "commit(s) " + (", ".join(f"`{c}`" for c in sorted(commits)) or "n/a") + ".", "",
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
    for m, recs in records.items():
        rates = [r["seconds_per_iteration"] for r in recs if r["seconds_per_iteration"]]
        walls = [r["wall_seconds"] for r in recs if r["wall_seconds"]]
        curve = mean_curve([record_curve(r) for r in recs])
        flat = "{:.1f}–{:.1f}".format(*last_quarter(*curve[:2])) if curve else "n/a"
        lines.append(f"| {m} | {', '.join(str(r['seed']) for r in recs)} | {results[m][0].mean():.1f} | "
                     f"{int((results[m][0] > 0).sum())} | "
                     f"{np.mean(results[m][0][rare]):.1f} | {flat} | {iterations_cell(recs)} | "
                     + (f"{np.mean(rates):.2f} | {np.mean(walls):.0f} |" if rates and walls else "n/a | n/a |"))
    machines = {}
    for m, recs in records.items():
        for r in recs:
            cpu = r.get("machine", {})
            key = f"{cpu.get('cpu', 'unknown CPU')}, {cpu.get('cores', '?')} cores, torch {cpu.get('torch', '?')}"
            machines.setdefault(key, []).append(f"{m} {r['seed']}")
    lines += ["", "Timing measured on " + "; ".join(f"{k} ({', '.join(v)})" for k, v in machines.items()) + "."]
    liver = SYNAPSE_ORGANS.index("liver") + 1
    lines += ["", "Where the voxels go (test cases, voxels summed over the seeds): the liver's predicted ÷ true "
              "volume, precision and recall; the share of voxels predicted as an organ that are background; "
              "precision and recall averaged over the organs (precision over those predicted at all).", "",
              "| method | liver predicted ÷ true | liver precision | liver recall | organ voxels on background % | "
              "organ precision | organ recall |", "|---|---|---|---|---|---|---|"]
    for m, recs in records.items():
        ratio, *rest = voxel_summary(sum(np.array(r["test"]["confusion"], np.int64) for r in recs), liver)
        lines.append(f"| {m} | {ratio:.2f} | " + " | ".join(f"{v:.1f}" for v in rest) + " |")
    left = [f"{f.method} seed {f.seed}" for f in folds if not f.done()]
    lines += ["", "Not yet recorded: " + (", ".join(left) if left else "nothing") + ".", "",
              f"![learning curves]({P.name}_curves.png)", "", f"![per-organ Dice]({P.name}_organs.png)", "",
              f"![per-class Dice]({P.name}.png)", ""]
    reading = prefix + "_reading.md"
    if os.path.isfile(reading):
        lines += [open(reading).read().rstrip(), ""]
    write_text(prefix + ".md", "\n".join(lines))
    print(f"wrote {prefix}.{{md,tex,csv,png}}, {prefix}_curves.png, {prefix}_organs.png")
