"""Gather several runs' evaluation results into one paper-style table (Markdown, LaTeX, CSV) and a bar chart.

Reads the ``results.json`` written by evaluate_Ntimes.py. Usage, from the repository root:
    python code/make_table.py --exps 'Task_synapse_20p/*' --out logs/Task_synapse_20p/table
Rows = methods; columns = per-organ Dice, average Dice, average ASD, each mean ± std over folds.
``--metrics paper`` (default) uses the paper's conventions (Q45-Q47, docs/original-quirks.md); ``standard`` uses Dice
with both-empty pairs excluded and symmetric ASSD in mm.
"""
import argparse
import csv
import glob
import io
import json
import logging
import os
import sys

import numpy as np

from utils.io import ConfigError, DataError, atomic_path, cli_main, log_root, write_text

log = logging.getLogger("make_table")

METRICS = {"paper": ("dice", "asd", "ASD (vox)"), "standard": ("dice", "assd_mm", "ASSD (mm)")}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Table of several methods' evaluation results.")
    p.add_argument("--exps", nargs="+", required=True,
                   help="experiments under logs/ (globs allowed), their folders, or results.json files")
    p.add_argument("--names", nargs="+", default=None, help="row labels, one per experiment (default: folder)")
    p.add_argument("--metrics", choices=tuple(METRICS), default="paper")
    p.add_argument("--out", default=None, help="output prefix: PREFIX.{md,tex,csv,png} (default logs/table)")
    return p.parse_args(argv)


def find_results(patterns):
    """Each pattern -> results.json paths: a file, a folder holding one, or an experiment under logs/ (glob)."""
    found = []
    for pattern in patterns:
        hits = sorted(glob.glob(pattern)) or sorted(glob.glob(os.path.join(log_root(), pattern)))
        if not hits:
            raise ConfigError(f"--exps {pattern}: matches nothing here or under {log_root()}/")
        for hit in hits:
            path = hit if hit.endswith(".json") else os.path.join(hit, "results.json")
            if os.path.isfile(path):
                found.append(path)
            elif len(hits) == 1:
                raise DataError(f"{path}: not found (run evaluate_Ntimes.py for this experiment first)")
    if not found:
        raise DataError(f"no results.json under {', '.join(patterns)} (run evaluate_Ntimes.py first)")
    return list(dict.fromkeys(found))


def load_results(paths, names=None):
    """[(row label, parsed results.json)]; every run must have the same classes. Default labels: the
    experiments' last folder names (``dhc``, ``cps``), or their full names when those repeat."""
    if names is not None and len(names) != len(paths):
        raise ConfigError(f"--names: {len(names)} names for {len(paths)} experiments")
    results = []
    for path in paths:
        try:
            with open(path) as f:
                res = json.load(f)
        except (OSError, ValueError) as e:
            raise DataError(f"{path}: unreadable results.json ({e})") from None
        missing = [k for k in ("class_names", "paper", "standard") if k not in res]
        if missing:
            raise DataError(f"{path}: not an evaluate_Ntimes.py results.json (no {', '.join(missing)})")
        if results and res["class_names"] != results[0]["class_names"]:
            raise DataError(f"{path}: classes {res['class_names']} differ from {paths[0]}")
        results.append(res)
    if names is None:
        full = [res.get("exp") or os.path.dirname(p) for res, p in zip(results, paths)]
        short = [os.path.basename(os.path.normpath(f)) for f in full]
        names = short if len(set(short)) == len(short) else full
    return list(zip(names, results))


def table_cells(rows, metrics):
    """Per method: (class Dice means, stds), (avg Dice, std), (avg ASD, std), folds — NaN for missing."""
    dice_key, asd_key, _ = METRICS[metrics]
    nan = lambda v: np.nan if v is None else v  # noqa: E731
    out = []
    for label, res in rows:
        d, a = res[metrics][dice_key], res[metrics][asd_key]
        out.append({"label": label, "folds": res.get("folds"),
                    "class_mean": np.array([nan(v) for v in d["class_mean"]], dtype=float),
                    "class_std": np.array([nan(v) for v in d["class_std"]], dtype=float),
                    "dice": (nan(d["mean"]), nan(d["std"])), "asd": (nan(a["mean"]), nan(a["std"]))})
    return out


def _pm(mean, std, fmt="{:.2f}", sep=" ± "):
    return "n/a" if np.isnan(mean) else fmt.format(mean) + sep + fmt.format(std)


def _best(cells):
    """Rows holding the best value of each column (highest Dice, lowest ASD); ties all count."""
    cols = [np.array([c["class_mean"][i] for c in cells]) for i in range(len(cells[0]["class_mean"]))]
    cols += [np.array([c["dice"][0] for c in cells]), -np.array([c["asd"][0] for c in cells])]
    return [set() if np.all(np.isnan(col)) else set(np.flatnonzero(col == np.nanmax(col)).tolist())
            for col in cols]


def render_markdown(cells, class_names, metrics):
    asd_head = METRICS[metrics][2]
    head = ["Method"] + list(class_names) + ["Avg Dice", f"Avg {asd_head}"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in cells:
        vals = [_pm(m, s) for m, s in zip(c["class_mean"], c["class_std"])] + [_pm(*c["dice"]), _pm(*c["asd"])]
        lines.append(f"| {c['label']} | " + " | ".join(vals) + " |")
    lines.append("")
    lines.append(f"Dice x100 and {asd_head}: mean ± std over folds ({metrics} conventions; folds: "
                 + ", ".join(f"{c['label']} {c['folds']}" for c in cells) + ").")
    return "\n".join(lines) + "\n"


def _tex(text):
    return str(text).replace("\\", r"\textbackslash{}").replace("_", r"\_").replace("%", r"\%").replace("&", r"\&")


def render_latex(cells, class_names, metrics):
    best = _best(cells)
    head = ["Method"] + [_tex(n) for n in class_names] + ["Avg Dice", _tex(f"Avg {METRICS[metrics][2]}")]
    lines = [r"\begin{tabular}{l" + "c" * (len(head) - 1) + "}", r"\toprule", " & ".join(head) + r" \\",
             r"\midrule"]
    for r, c in enumerate(cells):
        pairs = list(zip(c["class_mean"], c["class_std"])) + [c["dice"], c["asd"]]
        vals = []
        for col, (m, s) in enumerate(pairs):
            cell = _pm(m, s, sep=r"$\pm$")
            vals.append(r"\textbf{" + cell + "}" if r in best[col] and len(cells) > 1 else cell)
        lines.append(_tex(c["label"]) + " & " + " & ".join(vals) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


def render_csv(cells, class_names, metrics):
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    asd_key = METRICS[metrics][1]
    w.writerow(["method", "folds"] + [f"{n}_{k}" for n in class_names for k in ("dice", "dice_std")]
               + ["avg_dice", "avg_dice_std", f"avg_{asd_key}", f"avg_{asd_key}_std"])
    for c in cells:
        per_class = [repr(float(v)) for pair in zip(c["class_mean"], c["class_std"]) for v in pair]
        w.writerow([c["label"], c["folds"]] + per_class + [repr(float(v)) for v in (*c["dice"], *c["asd"])])
    return out.getvalue()


def plot_bars(cells, class_names, path):
    """Grouped bars: per-class Dice of each method, error bars = std over folds."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    x = np.arange(len(class_names))
    width = 0.8 / len(cells)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.7 * len(class_names) * max(1, len(cells) / 2)), 4))
    for i, c in enumerate(cells):
        ax.bar(x + (i - (len(cells) - 1) / 2) * width, np.nan_to_num(c["class_mean"]), width,
               yerr=np.nan_to_num(c["class_std"]), label=c["label"], capsize=2)
    ax.set_xticks(x, class_names, rotation=45, ha="right")
    ax.set_ylabel("Dice (%)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize="small")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def make_table(exps, out, names=None, metrics="paper"):
    """Write OUT.md, OUT.tex, OUT.csv, OUT.png; return the Markdown."""
    return write_tables(load_results(find_results(exps), names), out, metrics)


def write_tables(rows, out, metrics="paper"):
    """``make_table`` from rows already loaded: [(row label, results dict as in results.json)]."""
    class_names = rows[0][1]["class_names"]
    cells = table_cells(rows, metrics)
    markdown = render_markdown(cells, class_names, metrics)
    texts = {".md": markdown, ".tex": render_latex(cells, class_names, metrics),
             ".csv": render_csv(cells, class_names, metrics)}
    for ext, text in texts.items():
        write_text(out + ext, text)
    plot_bars(cells, class_names, out + ".png")
    return markdown


@cli_main
def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = args.out or os.path.join(log_root(), "table")
    markdown = make_table(args.exps, out, args.names, args.metrics)
    print(markdown, end="")
    log.info("wrote %s.{md,tex,csv,png}", out)


if __name__ == "__main__":
    sys.exit(main())
