"""What preprocess.py (Synapse, phantom) and preprocess_amos.py share: case discovery and validation, the split
rules common to both, and an all-or-nothing writer with its CLI.

See docs/pipeline.md#preprocessing and #splits; Q8, Q15, Q16, Q20, Q21 (docs/original-quirks.md). Bad input raises a
one-line DataError before anything reaches the output folder: every file is first written to a staging folder on the
same file system and only moved into place (``os.replace``, one file at a time, npy before splits) once all cases have
passed.
"""
import argparse
import contextlib
import dataclasses
import gzip
import json
import os
import shutil
import struct
import tempfile

import numpy as np
from tqdm import tqdm

from data.dataset import check_pair
from utils.geometry import Grid, align_label, reindexing
from utils.io import (ConfigError, DataError, cli_main, describe_error, npy_header, read_list, read_nifti,
                      remove_stale_tmp, save_npy, write_json, write_list)
from utils.task import REPO_ROOT
from utils.task import get_task

NII = ".nii.gz"
BASE_SPLITS = ("train", "eval", "test")
GENERATOR = "numpy.random.default_rng"


@dataclasses.dataclass(frozen=True)
class Case:
    id: str
    image: str  # raw NIfTI paths
    label: str


def resolve_task(task, layout, other_script):
    """TaskConfig from a name or a TaskConfig; ConfigError if its raw layout belongs to the other script."""
    task = get_task(task) if isinstance(task, str) else task
    if task.raw_layout != layout:
        raise ConfigError(f"--task {task.name}: has the {task.raw_layout} raw layout; run code/data/{other_script}")
    return task


# ---------------------------------------------------------------- discovery and validation

def _nifti_by_key(folder, prefix):
    """{key: path} for ``folder/<prefix><key>.nii.gz`` (hidden files ignored)."""
    if not os.path.isdir(folder):
        return {}
    return {name[len(prefix):-len(NII)]: os.path.join(folder, name) for name in os.listdir(folder)
            if name.startswith(prefix) and name.endswith(NII) and len(name) > len(prefix) + len(NII)}


def pair_cases(img_dir, lbl_dir, img_prefix, lbl_prefix, id_prefix=""):
    """Sorted image/label pairs ``img_dir/<img_prefix>K.nii.gz`` + ``lbl_dir/<lbl_prefix>K.nii.gz``, id
    ``<id_prefix>K``. An image without its label (or a label without its image) is a DataError."""
    images, labels = _nifti_by_key(img_dir, img_prefix), _nifti_by_key(lbl_dir, lbl_prefix)
    for key in sorted(images.keys() - labels.keys()):
        expected = os.path.join(lbl_dir, lbl_prefix + key + NII)
        raise DataError(f"{images[key]}: image without label (expected {expected})")
    for key in sorted(labels.keys() - images.keys()):
        expected = os.path.join(img_dir, img_prefix + key + NII)
        raise DataError(f"{labels[key]}: label without image (expected {expected})")
    return [Case(id_prefix + key, images[key], labels[key]) for key in sorted(images)]


def require_folder(raw_dir):
    if not os.path.isdir(raw_dir):
        raise DataError(f"{raw_dir}: input folder not found")


_NIFTI_FLOATS = {16: "f4", 64: "f8"}  # NIfTI-1 datatype codes FLOAT32, FLOAT64


def nonfinite_counts(path):
    """(NaN, ±inf) voxel counts of a float32/float64 NIfTI-1 file, counted in its bytes: ITK 5.4 (SimpleITK 2.5)
    silently reads both as 0 (fixed in ITK 6, InsightSoftwareConsortium/ITK#6683). (0, 0) for other data."""
    with (gzip.open if os.fspath(path).endswith(".gz") else open)(path, "rb") as f:
        header = f.read(348)
        order = next((o for o in "<>" if len(header) == 348 and struct.unpack(o + "i", header[:4])[0] == 348), None)
        code = struct.unpack(order + "h", header[70:72])[0] if order else None
        if code not in _NIFTI_FLOATS:
            return 0, 0
        f.read(max(0, int(struct.unpack(order + "f", header[108:112])[0]) - 348))  # skip to vox_offset
        data = np.frombuffer(f.read(), dtype=np.dtype(order + _NIFTI_FLOATS[code]))
    return int(np.isnan(data).sum()), int(np.isinf(data).sum())


def _check_finite(path, array, what):
    """NaN/inf in a float volume is bad input; checked in the file because the reader turns them into 0."""
    if array.dtype.kind == "f":
        n_nan, n_inf = nonfinite_counts(path)
        if n_nan or n_inf:
            raise DataError(f"{path}: {what} contains {'NaN' if n_nan else 'infinite'} "
                            f"{'intensities' if what == 'image' else 'values'}")


def load_case(case, num_cls):
    """(image, label, sitk image, note) of one case, checked: 3-D, the label on the image's grid (utils/geometry.py:
    size, spacing, origin, direction; a label stored in another orientation is re-indexed and ``note`` says so),
    no NaN/inf, integer labels in 0..C-1."""
    image, itk = read_nifti(case.image)
    label, label_itk = read_nifti(case.label)
    _check_finite(case.image, image, "image")
    _check_finite(case.label, label, "label")
    note = None
    if image.ndim == label.ndim == 3 and (label.shape == image.shape or
                                          reindexing(Grid.of_image(label_itk), Grid.of_image(itk)) is not None):
        label, note = align_label(label, Grid.of_image(label_itk), Grid.of_image(itk), case.label, case.image)
    check_pair(image, label, case.image, case.label, num_cls)  # other shapes: "label shape ... differs"
    return image, label, itk, note


def geometry_meta(itk, stored_shape, source, note=None):
    """``<id>_meta.json`` (brief's contract): geometry of the source image in SimpleITK (x, y, z) order; ``note``:
    how the label was brought onto the image grid, if it had to be."""
    meta = {"spacing": [float(v) for v in itk.GetSpacing()], "origin": [float(v) for v in itk.GetOrigin()],
            "direction": [float(v) for v in itk.GetDirection()], "shape": [int(v) for v in stored_shape],
            "source_shape": [int(v) for v in reversed(itk.GetSize())], "source": os.fspath(source)}
    if note:
        meta["label_reindexed"] = note
    return meta


# ---------------------------------------------------------------- split rules

def permuted(ids, rng):
    """A seeded permutation of the sorted ids (Q16: the original permuted an unsorted glob, unseeded)."""
    ids = sorted(ids)
    return [ids[i] for i in rng.permutation(len(ids))]


def head_tail(order, n):
    """(sorted first n, sorted rest) of an ordered id list."""
    return sorted(order[:n]), sorted(order[n:])


def labeled_split(train, ratio, seed):
    """docs/pipeline.md#splits: labeled_{p}p = first max(1, int(n·p/100)) of a permutation of the sorted train ids,
    unlabeled = rest.

    One generator per ratio (seeded with [seed, p]), so adding a ratio never changes the others' lists."""
    n_labeled = max(1, len(train) * ratio // 100)
    labeled, unlabeled = head_tail(permuted(train, np.random.default_rng([seed, ratio])), n_labeled)
    return {f"labeled_{ratio}p": labeled, f"unlabeled_{ratio}p": unlabeled}


LABELED_RULE = ("labeled_{p}p = first max(1, int(n*p/100)) of a permutation (default_rng([seed, p])) of the sorted "
                "train ids; unlabeled_{p}p = the rest")


def shipped_splits(folder_name, ids, ratios):
    """The original's split lists shipped in the repository (``<repo>/<folder_name>/splits/*.txt``): {name: ids}
    for train/eval/test and the labeled/unlabeled pairs of ``ratios`` that exist there, or None unless every listed
    id is among ``ids`` (other data, e.g. the phantom in the AMOS layout, gets seeded splits)."""
    folder = os.path.join(REPO_ROOT, folder_name, "splits")
    names = [n for n in split_names(ratios) if os.path.isfile(os.path.join(folder, f"{n}.txt"))]
    if not set(BASE_SPLITS) <= set(names):
        return None
    lists = {n: read_list(os.path.join(folder, f"{n}.txt")) for n in names}
    if not set().union(*lists.values()) <= set(ids):
        return None
    return lists


def split_names(ratios):
    return list(BASE_SPLITS) + [f"{kind}_{p}p" for p in ratios for kind in ("labeled", "unlabeled")]


def _read_existing(splits_dir, names):
    return {n: read_list(os.path.join(splits_dir, f"{n}.txt")) for n in names
            if os.path.isfile(os.path.join(splits_dir, f"{n}.txt"))}


def plan_splits(splits_dir, make_base, ratios, seed, force):
    """(all splits, names to write, rules) — existing split files are kept unless ``force`` (Q16).

    ``make_base(test, seed)`` returns ({train, eval, test}, rule); ``test`` is an existing test.txt kept on its own
    (the original ships only test.txt, Q15) or None. Labeled/unlabeled pairs come from the final train list."""
    existing = {} if force else _read_existing(splits_dir, split_names(ratios))
    have = [n for n in BASE_SPLITS if n in existing]
    if len(have) == len(BASE_SPLITS):
        splits, base_rule = {n: existing[n] for n in BASE_SPLITS}, None
    elif have in ([], ["test"]):
        splits, base_rule = make_base(existing.get("test"), seed)
        splits = {n: v for n, v in splits.items() if n in split_names(ratios)}  # only the requested ratios
    else:
        missing = [n for n in BASE_SPLITS if n not in existing]
        raise DataError(f"{splits_dir}: has {' '.join(n + '.txt' for n in have)} but not "
                        f"{' '.join(n + '.txt' for n in missing)}; use --force to regenerate the splits")
    rules = {n: base_rule for n in BASE_SPLITS if n not in existing}
    for p in ratios:
        pair = [f"labeled_{p}p", f"unlabeled_{p}p"]
        kept = [n for n in pair if n in existing]
        if len(kept) == 1:
            raise DataError(f"{os.path.join(splits_dir, kept[0] + '.txt')}: exists without its partner "
                            f"{(set(pair) - set(kept)).pop()}.txt; use --force to regenerate the splits")
        if kept:
            splits.update({n: existing[n] for n in kept})
        elif pair[0] in splits and base_rule is not None:  # the shipped lists come with their labeled pairs
            rules.update({n: base_rule for n in pair})
            continue
        else:
            splits.update(labeled_split(splits["train"], p, seed))
        rules.update({n: LABELED_RULE.format(p=p) for n in pair if n not in existing})
    return splits, [n for n in splits if n not in existing], rules


def check_splits(splits, ids, splits_dir, raw_dir):
    """Every split non-empty and made of known ids; train/eval/test disjoint; labeled/unlabeled partition train."""
    path = {n: os.path.join(splits_dir, f"{n}.txt") for n in splits}
    known = set(ids)
    for name, members in splits.items():
        if not members:
            raise DataError(f"{path[name]}: would be empty ({len(ids)} cases are too few to split)")
        unknown = sorted(set(members) - known)
        if unknown:
            raise DataError(f"{path[name]}: ids {', '.join(unknown[:5])} are not among the cases in {raw_dir}; "
                            f"use --force to regenerate the splits")
    for i, a in enumerate(BASE_SPLITS):
        for b in BASE_SPLITS[i + 1:]:
            shared = sorted(set(splits[a]) & set(splits[b]))
            if shared:
                raise DataError(f"{path[a]}: shares ids {', '.join(shared[:5])} with {b}.txt")
    for name in (n for n in splits if n.startswith("labeled_")):
        partner = "un" + name
        lab, unl = set(splits[name]), set(splits[partner])
        if lab & unl or lab | unl != set(splits["train"]):
            raise DataError(f"{path[name]}: {name}.txt and {partner}.txt do not partition train.txt")


def _split_info(splits_dir, task, seed, splits, written, rules):
    """split_info.json: this run's seed, and per file its count, seed and rule (kept files keep their record)."""
    old = {}
    with contextlib.suppress(OSError, ValueError):
        with open(os.path.join(splits_dir, "split_info.json")) as f:
            old = json.load(f)
    seeds, old_rules = old.get("seeds", {}), old.get("rules", {})
    return {"task": task.name, "seed": seed, "generator": GENERATOR,
            "counts": {n: len(v) for n, v in splits.items()},
            "seeds": {n: seed if n in written else seeds.get(n) for n in splits},
            "rules": {n: rules[n] if n in written else old_rules.get(n, "existing file, kept") for n in splits},
            "written": list(written), "kept": [n for n in splits if n not in written]}


# ---------------------------------------------------------------- all-or-nothing writer

def _existing_ancestor(path):
    while not os.path.isdir(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return path


@contextlib.contextmanager
def staging_folder(out_dir):
    """A temporary folder beside (or inside) ``out_dir`` on the same file system, always removed afterwards.
    Staging folders of killed runs (``.preprocess-staging-<pid>-*`` whose process is gone) and their ``.tmp-*``
    files in ``npy/`` and ``splits/`` are removed first."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ConfigError(f"{out_dir}: output path exists and is not a folder")
    parent = _existing_ancestor(os.path.abspath(out_dir))
    for folder in (parent, os.path.join(out_dir, "npy"), os.path.join(out_dir, "splits")):
        remove_stale_tmp(folder)
    try:
        stage = tempfile.mkdtemp(prefix=f".preprocess-staging-{os.getpid()}-", dir=parent)
    except OSError as e:
        raise ConfigError(f"{out_dir}: cannot write there ({describe_error(OSError(e.errno, e.strerror))})") from None
    try:
        yield stage
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _commit(stage, out_dir):
    """Move staged files into place: npy (per case image, label, meta) before splits, split_info.json last."""
    for sub in ("npy", "splits"):
        src = os.path.join(stage, sub)
        if not os.path.isdir(src):
            continue
        os.makedirs(os.path.join(out_dir, sub), exist_ok=True)
        for name in sorted(os.listdir(src), key=lambda n: (n == "split_info.json", n)):
            os.replace(os.path.join(src, name), os.path.join(out_dir, sub, name))


def npy_files(folder, case_id):
    return {k: os.path.join(folder, f"{case_id}_{k}.{ext}")
            for k, ext in (("image", "npy"), ("label", "npy"), ("meta", "json"))}


def kept_problem(files):
    """Why the existing files of a case cannot be kept, or None. Cheap: npy headers against file sizes, the two
    shapes, meta.json parsed (a copy cut short would otherwise be kept and only fail in training)."""
    try:
        (image_shape, _), (label_shape, _) = npy_header(files["image"]), npy_header(files["label"])
        with open(files["meta"]) as f:
            meta = json.load(f)
    except DataError as e:
        return str(e)
    except (OSError, ValueError) as e:
        return f"{files['meta']}: unreadable ({e})"
    if label_shape != image_shape:
        return f"{files['label']}: shape {label_shape} differs from the image's {image_shape}"
    if not isinstance(meta, dict) or list(meta.get("shape") or image_shape) != list(image_shape):
        return f"{files['meta']}: does not describe the stored image of shape {image_shape}"
    return None


def source_newer(case, files):
    """Why a kept case is out of date, or None: its source image or label was written after its npy files (a
    rewritten phantom, a corrected label), as make would judge it."""
    kept = min(os.path.getmtime(f) for f in files.values())
    for source in (case.image, case.label):
        if os.path.getmtime(source) > kept:
            return f"{source}: newer than its preprocessed copy"
    return None


def run_preprocessing(task, cases, convert, make_base, raw_dir, out_dir, seed, ratios, force, progress):
    """Convert ``cases`` with ``convert(case) -> (image, label, meta)`` and write npy + splits into ``out_dir``.

    Cases whose three files already exist, pass ``kept_problem`` and are newer than their sources are skipped
    unless ``force``; damaged or outdated ones are converted again; nothing is written if anything fails."""
    seed = task.split_seed if seed is None else seed
    ratios = sorted(set(task.label_ratios if ratios is None else ratios))
    if seed < 0:
        raise ConfigError(f"--seed {seed}: must be >= 0")
    for p in ratios:
        if not 0 < p < 100:
            raise ConfigError(f"--ratios {p}: not a percentage in 1..99")
    ids = [c.id for c in cases]
    npy_dir, splits_dir = os.path.join(out_dir, "npy"), os.path.join(out_dir, "splits")
    splits, written, rules = plan_splits(splits_dir, make_base, ratios, seed, force)
    check_splits(splits, ids, splits_dir, raw_dir)
    todo, damaged = [], {}
    for c in cases:
        files = npy_files(npy_dir, c.id)
        if force or not all(map(os.path.isfile, files.values())):
            todo.append(c)
        elif (problem := kept_problem(files) or source_newer(c, files)) is not None:
            damaged[c.id] = problem
            todo.append(c)
    notes = {}
    with staging_folder(out_dir) as stage:
        with tqdm(todo, desc=f"{task.name} cases", unit="case",
                  disable=True if not progress or not todo else None) as bar:  # None: no bar when not a TTY
            for case in bar:
                image, label, meta = convert(case)
                if meta.get("label_reindexed"):
                    notes[case.id] = meta["label_reindexed"]
                files = npy_files(os.path.join(stage, "npy"), case.id)
                save_npy(files["image"], image)
                save_npy(files["label"], label)
                write_json(files["meta"], meta)
        for name in written:
            write_list(os.path.join(stage, "splits", f"{name}.txt"), splits[name])
        if written:
            write_json(os.path.join(stage, "splits", "split_info.json"),
                       _split_info(splits_dir, task, seed, splits, written, rules))
        _commit(stage, out_dir)
    unsplit = sorted(set(ids) - set().union(*(splits[n] for n in BASE_SPLITS)))
    return {"task": task.name, "raw_dir": raw_dir, "data_dir": out_dir, "cases": len(cases), "seed": seed,
            "converted": [c.id for c in todo], "skipped": sorted(set(ids) - {c.id for c in todo}),
            "splits": {n: len(v) for n, v in splits.items()}, "splits_written": written,
            "splits_kept": [n for n in splits if n not in written], "unsplit": unsplit, "damaged": damaged,
            "label_notes": notes}


# ---------------------------------------------------------------- CLI

def build_parser(doc, default_task):
    p = argparse.ArgumentParser(description=doc.strip().splitlines()[0])
    p.add_argument("--task", default=default_task, help=f"task in config.py (default {default_task})")
    p.add_argument("--raw", default=None, help="raw NIfTI folder (default: the task's raw_dir)")
    p.add_argument("--out", default=None, help="output folder for npy/ and splits/ (default: the task's data_dir)")
    p.add_argument("--seed", type=int, default=None, help="split seed (default: the task's split_seed)")
    p.add_argument("--ratios", type=int, nargs="+", default=None,
                   help="labeled percentages (default: the task's label_ratios)")
    p.add_argument("--force", action="store_true",
                   help="rewrite existing npy files and regenerate existing split files")
    return p


def format_summary(s):
    lines = [f"{s['task']}: {s['cases']} cases from {s['raw_dir']} -> {os.path.join(s['data_dir'], 'npy')}: "
             f"{len(s['converted'])} written, {len(s['skipped'])} already there (kept; --force rewrites)"]
    counts = lambda names: " ".join(f"{n}={s['splits'][n]}" for n in names)  # noqa: E731
    if s["splits_written"]:
        lines.append(f"splits written (seed {s['seed']}): {counts(s['splits_written'])}")
    if s["splits_kept"]:
        lines.append(f"existing splits kept (--force regenerates): {counts(s['splits_kept'])}")
    for problem in s.get("damaged", {}).values():
        lines.append(f"converted again: {problem}")
    for note in s.get("label_notes", {}).values():
        lines.append(f"note: {note}")
    if s["unsplit"]:
        lines.append(f"warning: {len(s['unsplit'])} cases are in none of the kept train/eval/test lists: "
                     f"{' '.join(s['unsplit'][:10])}")
    return "\n".join(lines)


@cli_main
def run_cli(preprocess, doc, default_task, argv=None):
    """Parse flags, run ``preprocess``; DataError/ConfigError -> ``error: ...`` on stderr and exit code 2."""
    args = build_parser(doc, default_task).parse_args(argv)
    summary = preprocess(args.task, raw_dir=args.raw, out_dir=args.out, seed=args.seed, ratios=args.ratios,
                         force=args.force)
    print(format_summary(summary))
