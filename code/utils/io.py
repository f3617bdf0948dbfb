"""Errors, atomic writes, run-folder locks, split lists and NIfTI reading shared by every entry point.

Every output is written to a temporary name (``.tmp-<pid>-...``) in the destination folder and ``os.replace``d,
so a killed process never leaves a half-written file under the final name; the next writer of that folder removes
temporaries whose process is gone (``remove_stale_tmp``). Environment failures (disk full, read-only or
non-directory output, out of memory) become one ``error:`` line like bad input (``cli_main``, ``describe_error``).
"""
import contextlib
import errno
import functools
import gzip
import io
import json
import os
import re
import shutil
import struct
import sys
import tempfile
import zlib

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
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        if isinstance(e, OSError) and e.filename is None:
            e.filename = path  # a failed write names the output it was for (file objects do not)
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


def write_bytes(path, data):
    """The one place bytes reach a file (tests inject ENOSPC here); OSError propagates (see describe_error)."""
    with open(path, "wb") as f:
        f.write(data)


def torch_save(path, obj):
    """``torch.save`` atomically. Serialised in memory first and written by Python, so a full disk is an OSError
    (ENOSPC) naming the file, not the zip writer's generic RuntimeError."""
    import torch
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    with atomic_path(path) as tmp:
        write_bytes(tmp, buffer.getbuffer())


_TMP_PID = re.compile(r"^\.(?:tmp|preprocess-staging)-(\d+)-")


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_tmp(folder, all_pids=False):
    """Remove ``.tmp-<pid>-*`` / ``.preprocess-staging-<pid>-*`` left in ``folder`` by killed processes (their
    pid is gone; ``all_pids``: every one, for folders the caller holds locked). Returns the names removed."""
    removed = []
    if not os.path.isdir(folder):
        return removed
    for name in sorted(os.listdir(folder)):
        match = _TMP_PID.match(name)
        stale = name.startswith((".tmp-", ".preprocess-staging-")) and (
            all_pids or match is None or (int(match.group(1)) != os.getpid() and not pid_alive(int(match.group(1)))))
        if stale:
            path = os.path.join(folder, name)
            with contextlib.suppress(FileNotFoundError):
                shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.remove(path)
            removed.append(name)
    return removed


class FolderLock:
    """Exclusive ``fcntl.flock`` on ``<folder>/.lock``: one writer per run folder. The kernel drops the lock when
    the process ends (also after kill -9), so a lock is never stale; ``release`` (or the with-block) frees it."""

    NAME = ".lock"

    def __init__(self, folder, what="run folder"):
        import fcntl
        self.path = os.path.join(folder, self.NAME)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._fd)
            self._fd = None
            raise ConfigError(f"{folder}: another process is writing to this {what} (it holds {self.path}); "
                              "wait for it to finish or choose another --exp") from None
        os.ftruncate(self._fd, 0)
        os.write(self._fd, f"{os.getpid()}\n".encode())

    def release(self):
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


def read_list(path):
    """Ids of a split file: non-empty stripped lines, sorted.

    The original used ``np.loadtxt(dtype=str)``, which turns a one-line file into a string whose characters
    then get sorted (Q21, docs/original-quirks.md)."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: split file not found (run preprocessing first)")
    try:
        with open(path, encoding="utf-8-sig") as f:  # -sig: a byte order mark is not part of the first id
            ids = sorted(line.strip() for line in f if line.strip())
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not a UTF-8 text file of case ids (byte {e.start}: {e.reason})") from None
    if not ids:
        raise DataError(f"{path}: split file is empty")
    repeated = sorted({i for i, j in zip(ids, ids[1:]) if i == j})
    if repeated:  # a case listed twice would be drawn twice as often
        raise DataError(f"{path}: ids listed more than once: {', '.join(repeated[:5])}")
    return ids


def npy_header(path):
    """(shape, dtype) of a complete npy file, or a DataError saying what is wrong with it. Cheap: only the header
    is read and the file size compared with what it promises (a copy cut short, or padded, is damaged)."""
    try:
        array = np.load(path, mmap_mode="r")
    except (OSError, ValueError, EOFError) as e:
        raise DataError(f"{path}: unreadable npy file ({e})") from None
    shape, dtype, expected = array.shape, array.dtype, array.offset + array.nbytes
    del array  # closes the map
    size = os.path.getsize(path)
    if size != expected:
        raise DataError(f"{path}: damaged npy file ({size} bytes, its header promises {expected})")
    return shape, dtype


def write_list(path, ids):
    write_text(path, "".join(f"{i}\n" for i in sorted(ids)))


_NIFTI_HEADERS = {  # sizeof_hdr -> (struct format of datatype, bitpix, dim[8], vox_offset; their offsets)
    348: ("h", 70, "h", 72, "8h", 40, "f", 108),
    540: ("h", 12, "h", 14, "8q", 16, "q", 168),
}


def _nifti_payload_size(header):
    """(bytes the header promises: vox_offset + voxels * bitpix / 8) of a NIfTI-1/2 header, or None if unknown."""
    for order in "<>":
        if len(header) < 4:
            return None
        size = struct.unpack(order + "i", header[:4])[0]
        layout = _NIFTI_HEADERS.get(size)
        if layout is None or len(header) < size:
            continue
        _, _, f_bitpix, o_bitpix, f_dim, o_dim, f_off, o_off = layout
        bitpix = struct.unpack_from(order + f_bitpix, header, o_bitpix)[0]
        dim = struct.unpack_from(order + f_dim, header, o_dim)
        offset = struct.unpack_from(order + f_off, header, o_off)[0]
        if not 1 <= dim[0] <= 7 or bitpix <= 0 or min(dim[1:dim[0] + 1]) < 0:
            return None
        n = 1
        for d in dim[1:dim[0] + 1]:
            n *= d
        return int(max(offset, size)) + n * bitpix // 8
    return None


def check_nifti_complete(path, chunk=1 << 24):
    """DataError unless ``path`` holds a complete NIfTI: the whole gzip stream decompresses with a good CRC and
    the data is at least as long as the header promises. ITK reads a truncated file as zeros without an error."""
    opener = gzip.open if os.fspath(path).endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            header = f.read(540)
            total = len(header)
            while True:
                block = f.read(chunk)
                if not block:
                    break
                total += len(block)
    except EOFError:
        raise DataError(f"{path}: unreadable NIfTI (truncated: the gzip stream ends early; copy it again)") from None
    except (gzip.BadGzipFile, zlib.error) as e:
        raise DataError(f"{path}: unreadable NIfTI (corrupt gzip data: {e}; copy it again)") from None
    expected = _nifti_payload_size(header)
    if expected is None:
        raise DataError(f"{path}: unreadable NIfTI (not a NIfTI-1/2 header)")
    if total < expected:
        raise DataError(f"{path}: unreadable NIfTI (truncated: {total} of {expected} bytes of header + voxel "
                        "data; copy it again)")


def read_nifti(path):
    """(array in (D, H, W) order, SimpleITK image for its geometry). Missing, truncated, corrupt or otherwise
    unreadable files raise DataError (checked before ITK, which reads a truncated file as zeros)."""
    import SimpleITK as sitk
    if not os.path.isfile(path):
        raise DataError(f"{path}: file not found")
    check_nifti_complete(path)
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


_OS_HINTS = {
    errno.ENOSPC: "no space left on device: the disk is full; free space and run again",
    errno.EDQUOT: "disk quota exceeded: the disk is full for this user; free space and run again",
    errno.EROFS: "read-only file system: choose a writable output folder",
    errno.EACCES: "permission denied: choose a writable output folder",
    errno.EPERM: "operation not permitted: choose a writable output folder",
    errno.ENOTDIR: "a path component is a file, not a folder",
    errno.EISDIR: "is a folder, expected a file",
    errno.EEXIST: "exists and is not a folder",
}


def describe_error(e):
    """One line for an environment failure (OSError, out of memory), or None for anything else (a bug)."""
    if isinstance(e, OSError):
        where = " -> ".join(os.fspath(p) for p in (e.filename, e.filename2) if p is not None)
        what = _OS_HINTS.get(e.errno, e.strerror or str(e))
        return f"{where}: {what}" if where else what
    if isinstance(e, MemoryError) or (isinstance(e, RuntimeError) and is_out_of_memory(e)):
        return "out of memory"
    return None


def checkpoint_problem(path, error):
    """Why ``torch.load`` failed on ``path``, told from the file itself (torch's own message for a damaged file can
    advise retrying with ``weights_only=False``, which would not help)."""
    import zipfile
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(16)
    if size == 0:
        return "empty file (0 bytes)"
    if head.startswith(b"PK\x03\x04"):  # torch.save's zip format
        try:
            with zipfile.ZipFile(path) as archive:
                bad = archive.testzip()
        except (zipfile.BadZipFile, OSError, EOFError, ValueError):
            return f"truncated or corrupt zip archive ({size} bytes)"
        if bad is not None:
            return f"corrupt zip archive (member {bad} fails its CRC check)"
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(error))
        if found:
            return f"holds Python objects besides tensors ({found.group(1)}), so it is not a weights file"
        return f"a zip archive that is not a PyTorch checkpoint ({type(error).__name__})"
    if head[:1] == b"\x80":  # a pickle: the legacy (torch < 1.6) format or another program's file
        return f"a pickle that is not a readable PyTorch checkpoint ({size} bytes, damaged or another program's)"
    return f"not a PyTorch checkpoint (neither a zip archive nor a pickle; it starts with {head[:8]!r})"


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread so ``finally`` blocks (staging folders, temporaries) run as for Ctrl-C."""


@contextlib.contextmanager
def sigterm_raises():
    """Within the block SIGTERM raises ``Terminated`` (main thread only; elsewhere a no-op)."""
    import signal
    import threading
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def interrupt_exit(e):
    """(message, exit code) of Ctrl-C (130) or SIGTERM (143)."""
    return ("terminated", 143) if isinstance(e, Terminated) else ("interrupted", 130)


def is_out_of_memory(e):
    """torch's CUDA OutOfMemoryError or a CPU allocator failure (both RuntimeErrors)."""
    text = str(e)
    return type(e).__name__ == "OutOfMemoryError" or "out of memory" in text or "can't allocate memory" in text \
        or isinstance(e, MemoryError)


def cli_main(func):
    """Decorate a command-line ``main``: a DataError/ConfigError, or an environment failure (disk full, read-only
    or non-directory output: OSError; out of memory), becomes one ``error: <message>`` line on stderr and exit
    code 2 (no traceback); other exceptions are bugs and keep theirs. Ctrl-C exits 130 and SIGTERM 143 with one
    line, after the ``finally`` blocks have removed staging folders. Returns 0 on success."""
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            with sigterm_raises():
                code = func(*args, **kwargs)
        except (DataError, ConfigError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        except (OSError, MemoryError, RuntimeError) as e:
            message = describe_error(e)
            if message is None:
                raise
            print(f"error: {message}", file=sys.stderr)
            return 2
        except KeyboardInterrupt as e:
            message, code = interrupt_exit(e)
            print(message, file=sys.stderr)
            return code
        return 0 if code is None else code
    return wrapper


def read_nifti_header(path):
    """The SimpleITK reader of ``path`` with its header read (size, spacing, origin, direction), no voxels; an
    unreadable header is one DataError naming the file."""
    import SimpleITK as sitk
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        raise DataError(f"{path}: unreadable NIfTI header") from None
    return reader
