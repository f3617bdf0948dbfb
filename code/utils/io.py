"""Errors, atomic writes, split lists and NIfTI reading shared by every entry point.

Every output is written to a temporary name in the destination folder and ``os.replace``d, so a killed
process never leaves a half-written file under the final name.
"""
import contextlib
import functools
import json
import os
import sys
import tempfile

import numpy as np


class DataError(Exception):
    """Bad input data; the message names the file and the problem in one line."""


class ConfigError(Exception):
    """Bad command line or configuration; the message names the option and the valid values."""


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside ``path``; rename it to ``path`` only if the block succeeds.

    The temporary name keeps the final suffix (``.npy``, ``.nii.gz``) so libraries that pick the format
    from the extension write the right thing.
    """
    path = os.fspath(path)
    folder, name = os.path.split(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{os.getpid()}-", suffix="-" + name, dir=folder)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; outputs get the usual permissions
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def save_npy(path, array):
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, array)


def write_text(path, text):
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            f.write(text)


def write_json(path, obj):
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def torch_save(path, obj):
    import torch
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def read_list(path):
    """Ids of a split file: non-empty stripped lines, sorted.

    The original used ``np.loadtxt(dtype=str)``, which turns a one-line file into a string whose characters
    then get sorted (Q21)."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: split file not found (run preprocessing first)")
    with open(path) as f:
        ids = sorted(line.strip() for line in f if line.strip())
    if not ids:
        raise DataError(f"{path}: split file is empty")
    return ids


def write_list(path, ids):
    write_text(path, "".join(f"{i}\n" for i in sorted(ids)))


def read_nifti(path):
    """(array in (D, H, W) order, SimpleITK image for its geometry). Unreadable files raise DataError."""
    import SimpleITK as sitk
    if not os.path.isfile(path):
        raise DataError(f"{path}: file not found")
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as e:
        first = str(e).strip().splitlines()[-1] if str(e).strip() else "unknown error"
        raise DataError(f"{path}: unreadable NIfTI ({first})") from None
    return sitk.GetArrayFromImage(image), image


def log_root():
    """Folder holding every experiment (original: ./logs); DHC_LOG_ROOT overrides it."""
    return os.environ.get("DHC_LOG_ROOT", "logs")


def exp_dir(exp):
    """``logs/<exp>``: train.log, run.json, ckpts/, tensorboard/, predictions_<cps>/ of one run."""
    return os.path.join(log_root(), exp)


def cli_main(func):
    """Decorate a command-line ``main``: a DataError/ConfigError becomes one ``error: <message>`` line on stderr
    and exit code 2 (no traceback); other exceptions are bugs and keep theirs. Returns 0 on success."""
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            code = func(*args, **kwargs)
        except (DataError, ConfigError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        return 0 if code is None else code
    return wrapper
