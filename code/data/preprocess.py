"""Synapse (BTCV) or phantom NIfTI volumes -> npy + split lists (docs/pipeline.md#preprocessing;
Qn: docs/original-quirks.md).

Images are stored as float32 raw intensities and labels as int8 on the source grid: no resampling and no
normalisation here (the window and the in-plane halving are applied once at load time, Q24). Both the renamed
layout imagesTr/img0001.nii.gz + labelsTr/label0001.nii.gz and BTCV's Training/img + Training/label are read (Q20).
Splits (Q15, Q16): sorted ids and a recorded seed; the original's test ids are the test split when present.

    python code/data/preprocess.py [--task synapse|phantom] [--raw DIR] [--out DIR] [--seed N]
                                   [--ratios 10 20 40] [--force]
"""
import functools
import os
import sys

if __name__ == "__main__":  # run as `python code/data/preprocess.py`: make code/ importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np

from data.preprocess_common import (geometry_meta, head_tail, load_case, pair_cases, permuted, require_folder,
                                    resolve_task, run_cli, run_preprocessing)
from data.transforms import stored_volume
from utils.io import DataError

LAYOUTS = (("imagesTr", "labelsTr"), (os.path.join("Training", "img"), os.path.join("Training", "label")))
# The test list shipped at HEAD (Q15); the other 24 of the 30 Synapse cases are split 20 train / 4 eval.
ORIGINAL_TEST = ("0008", "0027", "0029", "0033", "0037", "0039")


def find_cases(raw_dir):
    """Sorted cases (id "0001") of the first layout that has files: imagesTr/labelsTr, else Training/img|label."""
    require_folder(raw_dir)
    for img_sub, lbl_sub in LAYOUTS:
        cases = pair_cases(os.path.join(raw_dir, img_sub), os.path.join(raw_dir, lbl_sub), "img", "label")
        if cases:
            return cases
    raise DataError(f"{raw_dir}: no cases found (expected imagesTr/img*.nii.gz + labelsTr/label*.nii.gz, "
                    f"or BTCV Training/img/img*.nii.gz + Training/label/label*.nii.gz)")


def synapse_splits(ids, test, seed):
    """({train, eval, test}, rule). Test: the given list (an existing test.txt), else the original's test ids
    if all present, else the last N - int(0.8 N) of a seeded permutation (the original's rule). The rest is
    split first int(5/6 n) train / rest eval of a seeded permutation: 30 -> 20/4/6, 20 (phantom) -> 13/3/4."""
    rng = np.random.default_rng(seed)
    if test is not None:
        rule = "test = existing test.txt (kept)"
    elif set(ORIGINAL_TEST) <= set(ids):
        test, rule = list(ORIGINAL_TEST), "test = the original's HEAD test.txt ids (Q15)"
    if test is None:
        order = permuted(ids, rng)
        pool, test = order[:len(ids) * 4 // 5], order[len(ids) * 4 // 5:]
        rule = "seeded permutation of the sorted ids: first int(0.8 N) train+eval, rest test"
    else:
        pool = permuted(set(ids) - set(test), rng)
    train, evals = head_tail(pool, len(pool) * 5 // 6)
    rule += "; train+eval (in permuted order): first int(5/6 n) train, rest eval"
    return {"train": train, "eval": evals, "test": sorted(test)}, rule


def convert_case(case, task):
    """(float32 image, int8 label, meta) on the source grid, raw intensities (docs/pipeline.md#preprocessing)."""
    image, label, itk, note = load_case(case, task.num_cls)
    image = stored_volume(image, task)
    return image, label.astype(np.int8), geometry_meta(itk, image.shape, case.image, note)


def preprocess(task="synapse", raw_dir=None, out_dir=None, seed=None, ratios=None, force=False, progress=True):
    """Write ``<out_dir>/npy/<id>_{image,label}.npy`` + ``<id>_meta.json`` and ``<out_dir>/splits/*.txt``.

    ``task``: name or TaskConfig with the Synapse layout; ``raw_dir``/``out_dir`` default to the task's
    raw_dir/data_dir, ``seed`` to its split_seed, ``ratios`` to its label_ratios. Existing npy (all three files
    of a case) and split files are kept unless ``force``. Returns a summary dict; bad input raises DataError /
    ConfigError and writes nothing."""
    task = resolve_task(task, "synapse", "preprocess_amos.py")
    raw_dir = task.raw_dir if raw_dir is None else raw_dir
    cases = find_cases(raw_dir)
    return run_preprocessing(task, cases, functools.partial(convert_case, task=task),
                             functools.partial(synapse_splits, [c.id for c in cases]), raw_dir,
                             task.data_dir if out_dir is None else out_dir, seed, ratios, force, progress)


def main(argv=None):
    return run_cli(preprocess, __doc__, "synapse", argv)


if __name__ == "__main__":
    sys.exit(main())
