"""AMOS22 NIfTI volumes -> npy on the fixed grid + split lists (docs/pipeline.md#preprocessing;
Qn: docs/original-quirks.md).

Every volume is resized to ``task.fixed_grid`` = (80, 160, 160) whatever its spacing (Q19, Q48): the image
trilinearly (align_corners=False) as float32 raw intensities, the label by nearest neighbour. Labels are stored
as uint8 (the original wrote float32, Q19: a named difference; readers accept either). imagesTr/labelsTr are
split train/eval (int(0.9 N) / rest of a seeded permutation), imagesVa/labelsVa are the test split (Q50).

    python code/data/preprocess_amos.py [--raw DIR] [--out DIR] [--seed N] [--ratios 2 5 10] [--force]
"""
import functools
import os
import sys

if __name__ == "__main__":  # run as `python code/data/preprocess_amos.py`: make code/ importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np

from data.preprocess_common import (geometry_meta, head_tail, load_case, pair_cases, permuted, require_folder,
                                    resolve_task, run_cli, run_preprocessing, shipped_splits)
from data.transforms import resize_label, stored_volume
from utils.io import DataError

SUBSETS = ("Tr", "Va")  # imagesTr/labelsTr -> train + eval, imagesVa/labelsVa -> test


def find_cases(raw_dir):
    """{"Tr": cases, "Va": cases} with ids "amos_0001"; each subset must have at least one case."""
    require_folder(raw_dir)
    found = {}
    for sub in SUBSETS:
        img_dir, lbl_dir = os.path.join(raw_dir, f"images{sub}"), os.path.join(raw_dir, f"labels{sub}")
        found[sub] = pair_cases(img_dir, lbl_dir, "amos_", "amos_", id_prefix="amos_")
        if not found[sub]:
            raise DataError(f"{img_dir}: no cases found (expected amos_XXXX.nii.gz with labels in {lbl_dir})")
    both = sorted({c.id for c in found["Tr"]} & {c.id for c in found["Va"]})
    if both:
        raise DataError(f"{raw_dir}: ids {', '.join(both[:5])} are in both imagesTr and imagesVa")
    return found


SHIPPED_RATIOS = (2, 5, 10)  # the original's 20 % pair is not shipped: 20 of its ids are eval cases (see README)


def amos_splits(tr_ids, va_ids, test, seed):
    """({train, eval, test[, labeled/unlabeled 2/5/10 %]}, rule): the original's lists shipped in
    ``amos_data/splits/`` when every id in them is among the cases (and an existing test.txt equals theirs);
    otherwise test = all Va (or an existing test.txt) and train/eval = first int(0.9 N) / rest of a seeded
    permutation of the other Tr ids (240 -> 216/24)."""
    shipped = shipped_splits("amos_data", set(tr_ids) | set(va_ids), SHIPPED_RATIOS)
    if shipped is not None and (test is None or sorted(test) == shipped["test"]):
        return shipped, "the original's split lists (shipped in amos_data/splits/)"
    test = sorted(va_ids) if test is None else test
    pool = permuted(set(tr_ids) - set(test), np.random.default_rng(seed))
    train, evals = head_tail(pool, len(pool) * 9 // 10)
    rule = "test = all imagesVa ids; imagesTr: seeded permutation of the sorted ids, first int(0.9 N) train, rest eval"
    return {"train": train, "eval": evals, "test": sorted(test)}, rule


def convert_case(case, task):
    """(float32 image, uint8 label, meta) on task.fixed_grid; meta geometry is the source image's."""
    image, label, itk, note = load_case(case, task.num_cls)
    image = stored_volume(image, task)
    label = resize_label(label, task.fixed_grid).astype(np.uint8)  # stored as uint8 (Q19; the original: float32)
    return image, label, geometry_meta(itk, image.shape, case.image, note)


def preprocess(task="amos", raw_dir=None, out_dir=None, seed=None, ratios=None, force=False, progress=True):
    """As ``preprocess.preprocess`` for the AMOS layout: npy on the fixed grid, Va = test. Returns a summary."""
    task = resolve_task(task, "amos", "preprocess.py")
    raw_dir = task.raw_dir if raw_dir is None else raw_dir
    found = find_cases(raw_dir)
    make_base = functools.partial(amos_splits, [c.id for c in found["Tr"]], [c.id for c in found["Va"]])
    return run_preprocessing(task, sorted(found["Tr"] + found["Va"], key=lambda c: c.id),
                             functools.partial(convert_case, task=task), make_base, raw_dir,
                             task.data_dir if out_dir is None else out_dir, seed, ratios, force, progress)


def main(argv=None):
    return run_cli(preprocess, __doc__, "amos", argv)


if __name__ == "__main__":
    sys.exit(main())
