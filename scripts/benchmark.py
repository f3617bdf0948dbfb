"""The phantom benchmark: every method of ``code/train_<m>.py`` plus the two bounds under one protocol
(``config.BENCHMARK``), test, evaluation, the table and the figures of docs/benchmark/phantom_20p.md.

Run by ``make benchmark`` (``METHODS="dhc cps"``, ``SEEDS="0"``, ``JOBS=2`` pick a subset). Resumable at fold level:
a fold with a run record (``docs/benchmark/runs/<method>_seed<seed>.json``, written when it was trained and tested;
$DHC_BENCHMARK_RUNS moves the folder) is done, on any machine; an interrupted one continues with ``--resume``; a fold
being trained by another process (its folder locked) is left to it. Folds run side by side, one single-threaded
process each (on two cores two such runs learn faster per second than one run on two threads:
docs/benchmark/first_pass/phantom_20p.md). Rows:
``fully`` is the labeled-only VNet (lower bound), ``fully_all`` a VNet on every training case (upper bound).
``--status`` prints what is done and left with an estimate from the measured seconds per iteration; ``--report``
only records the folds finished but not yet recorded and (re)writes the table and figures from the records.
"""
import argparse
import glob
import math
import os
import re
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [os.path.join(ROOT, "code"), ROOT]
from config import BENCHMARK as P  # noqa: E402

BOUNDS = ("fully", "fully_all")
FIRST = ("dhc", "fully_all", "cps", "fully")  # trained first, and with every seed before the others' second seed
RUNS = os.path.join("docs", "benchmark", "runs")  # the run records, committed with the page
LOG_LINE = re.compile(r"^\[(\d\d):(\d\d):(\d\d)\.\d+\] epoch (\d+) \|")


def all_methods():
    found = sorted(os.path.basename(p)[6:-3] for p in glob.glob(os.path.join(ROOT, "code", "train_*.py")))
    return [m for m in FIRST if m in found or m == "fully_all"] + [m for m in found if m not in FIRST]


def env():
    """The benchmark's phantom, log and run-record folders (each overridable by its variable), set in this process too
    (its ``get_task("phantom")``) and passed to the children with one thread each."""
    for name, default in (("DHC_PHANTOM_RAW", P.raw_dir), ("DHC_PHANTOM_DATA", P.data_dir),
                          ("DHC_LOG_ROOT", P.log_root), ("DHC_BENCHMARK_RUNS", RUNS)):
        os.environ.setdefault(name, os.path.join(ROOT, default))
    return dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
                PYTHONPATH=os.pathsep.join([os.path.join(ROOT, "code"), ROOT]))


ENV = env()
from utils.io import ConfigError, cli_main  # noqa: E402
from utils.task import get_task  # noqa: E402
PHANTOM = get_task("phantom")


def split_size(name):
    with open(PHANTOM.split_path(name)) as f:
        return sum(1 for line in f if line.strip())


def method_info(method):
    """(script, iterations per epoch, iterations wanted, extra flags) of a row."""
    from engine import Method
    import importlib
    import inspect
    script = "fully" if method == "fully_all" else method
    module = importlib.import_module(f"train_{script}")
    (cls,) = [c for _, c in inspect.getmembers(module, inspect.isclass)
              if issubclass(c, Method) and c.__module__ == module.__name__]
    batch = cls.defaults.get("batch_size", 2)
    n = split_size("unlabeled_%dp" % P.label_ratio if cls.uses_unlabeled else
                   "train" if method == "fully_all" else "labeled_%dp" % P.label_ratio)
    per_epoch = n // batch if cls.drop_last else math.ceil(n / batch)
    labeled = "train" if method == "fully_all" else f"labeled_{P.label_ratio}p"
    unetrpp = method == "dhc_unetrpp"
    extra = ["-sl", labeled, "-su", f"unlabeled_{P.label_ratio}p", "--base_lr",
             str(P.unetrpp_base_lr if unetrpp else P.base_lr), "--patch_size",
             *map(str, P.unetrpp_patch_size if unetrpp else P.patch_size)]
    return script, per_epoch, P.bound_iterations if method == "fully_all" else P.iterations, extra


class Fold:
    def __init__(self, method, seed):
        self.method, self.seed = method, seed
        self.fold = P.seeds.index(seed) + 1 if seed in P.seeds else len(P.seeds) + 1
        self.exp = f"Task_phantom_{P.label_ratio}p/{method}/fold{self.fold}"
        self.folder = os.path.join(ENV["DHC_LOG_ROOT"], self.exp)
        self.record = os.path.join(ENV["DHC_BENCHMARK_RUNS"], f"{method}_seed{seed}.json")
        self.script, self.per_epoch, iterations, self.extra = method_info(method)
        self.max_epoch, self.eval_every = P.schedule(self.per_epoch, iterations)
        self.iterations = (self.max_epoch + 1) * self.per_epoch

    def done(self):
        """Recorded under this protocol (benchmark_report.fold_record): finished here or on another machine. A record
        of another ``config.BENCHMARK`` does not count: the fold is trained again and its record replaced."""
        from benchmark_report import protocol_changes, read_record
        return os.path.isfile(self.record) and not protocol_changes(read_record(self.record))

    def rate(self):
        """Seconds per iteration: the record's, else measured from the log so far (None before three epochs)."""
        if self.done():
            from benchmark_report import read_record
            return read_record(self.record)["seconds_per_iteration"]
        return seconds_per_iteration(self)

    def trained(self):
        log = os.path.join(self.folder, "train.log")
        return os.path.isfile(os.path.join(self.folder, "ckpts", "best_model.pth")) and os.path.isfile(log) \
            and any(line.startswith("[") and "] done: best mean dice" in line for line in open(log, errors="replace"))

    def tested(self):
        return len(glob.glob(os.path.join(self.folder, "predictions_AB", "*.nii.gz"))) == split_size("test")

    def busy(self):
        """True if another process holds the run folder's lock (it is training this fold now)."""
        from utils.io import FolderLock
        if not os.path.isdir(self.folder):
            return False
        try:
            with FolderLock(self.folder):
                return False
        except Exception:
            return True

    def epochs_done(self):
        epochs = [int(m.group(4)) for m in map(LOG_LINE.match, _lines(self.folder)) if m]
        return max(epochs) + 1 if epochs else 0

    def train_cmd(self):
        cmd = [sys.executable, os.path.join(ROOT, "code", f"train_{self.script}.py"), "--task", "phantom",
               "--exp", self.exp, "--seed", str(self.seed), "-g", "0", "--device", "cpu",
               "-w", str(P.cps_w), "-r",
               "--n_filters", str(P.n_filters), "-ep", str(self.max_epoch), "--eval_every", str(self.eval_every),
               *self.extra]
        if os.path.isfile(os.path.join(self.folder, "ckpts", "last.pth")):
            cmd.append("--resume")
        return cmd

    def test_cmd(self):
        return [sys.executable, os.path.join(ROOT, "code", "test.py"), "--task", "phantom", "--exp", self.exp,
                "-g", "0", "--cps", "AB"]


def _commit():
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip() + ("+changes" if subprocess.run(
                                  ["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                                  capture_output=True, text=True).stdout.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


COMMIT = _commit()


def _lines(folder):
    path = os.path.join(folder, "train.log")
    return open(path, errors="replace").read().splitlines() if os.path.isfile(path) else []


def working_gaps(gaps):
    """The gaps (seconds between log lines) a process spent working: a gap over ten times the median, and over a
    minute, is a pause (a stopped or restarted process, a test suite holding the cores) and is left out."""
    limit = max(60.0, 10 * statistics.median(gaps)) if gaps else 0.0
    return [g for g in gaps if g <= limit]


def seconds_per_iteration(fold):
    """Measured wall seconds per iteration (validation included) from a fold's train.log, or None."""
    stamps = [(int(m.group(1)) * 3600 + int(m.group(2)) * 60 + int(m.group(3)), int(m.group(4)))
              for m in map(LOG_LINE.match, _lines(fold.folder)) if m]
    if len(stamps) < 3:
        return None
    kept = working_gaps([(t1 - t0) % 86400 for (t0, e0), (t1, e1) in zip(stamps, stamps[1:]) if e1 == e0 + 1])
    return sum(kept) / (len(kept) * fold.per_epoch) if kept else None


def plan(methods, seeds):
    """Folds in the order they run: the first seed of every row (DHC, the bounds and CPS first), then the rest."""
    folds = [Fold(m, s) for s in seeds[:1] for m in methods]
    folds += [Fold(m, s) for m in methods if m in FIRST for s in seeds[1:]]
    folds += [Fold(m, s) for s in seeds[1:] for m in methods if m not in FIRST]
    return folds


def status(folds, jobs):
    """Lines: per fold done / running / left, and the estimated remaining time on ``jobs`` lanes."""
    measured = {}
    for f in folds:
        rate = f.rate()
        if rate:
            measured.setdefault(f.method, []).append(rate)
    two_net = [sum(v) / len(v) for m, v in measured.items() if m not in BOUNDS]
    fallback = max(two_net) if two_net else 1.5
    left_s, lines = 0.0, []
    for f in folds:
        rate = sum(measured[f.method]) / len(measured[f.method]) if f.method in measured else None
        if f.done():
            state = "done"
        elif f.trained() and f.tested():
            state = "trained and tested, to be recorded"
        else:
            remaining = f.iterations - f.epochs_done() * f.per_epoch
            left_s += remaining * (rate or fallback) + 30  # + test
            state = ("running elsewhere" if f.busy() else "left") + f" ({remaining} of {f.iterations} iterations)"
        lines.append(f"  {f.method:12s} seed {f.seed:<4d} fold{f.fold}  "
                     f"{'%.2f s/it' % rate if rate else 's/it n/a':>10s}  {state}")
    done = sum(1 for f in folds if f.done())
    lines.append(f"{done} of {len(folds)} folds done; about {left_s / max(1, jobs) / 3600:.1f} h left on {jobs} "
                 f"lanes (measured s/it per method; {fallback:.2f} s/it assumed where none is measured)")
    return lines


def run_fold(fold, log=print, wait=True):
    """Train (or resume), test and record one fold; its output goes to <fold>/benchmark.log. Returns an error or None.
    A fold another process is training keeps this lane: ``wait`` until it ends, then test it (else give up)."""
    if fold.done():
        return None
    if fold.busy():
        if not wait:
            return "running in another process; left to it"
        log(f"{datetime.now():%H:%M:%S} waiting: {fold.method} seed {fold.seed} is trained by another process")
        while fold.busy():
            time.sleep(20)
    os.makedirs(fold.folder, exist_ok=True)
    with open(os.path.join(fold.folder, "benchmark.log"), "a") as out:
        for step, cmd, needed in (("train", fold.train_cmd(), not fold.trained()),
                                  ("test", fold.test_cmd(), not fold.tested())):
            if not needed:
                continue
            out.write(f"\n# {datetime.now():%Y-%m-%d %H:%M:%S} commit {COMMIT}\n# {' '.join(cmd)}\n")
            out.flush()
            log(f"{datetime.now():%H:%M:%S} start {step}: {fold.method} seed {fold.seed}")
            rc = subprocess.call(cmd, stdout=out, stderr=subprocess.STDOUT, env=ENV, cwd=ROOT)
            if rc:
                error = f"{step} exited with {rc} (see {out.name})"
                log(f"{datetime.now():%H:%M:%S} failed: {fold.method} seed {fold.seed}: {error}")
                return error
    from benchmark_report import write_record
    write_record(fold)
    log(f"{datetime.now():%H:%M:%S} done: {fold.method} seed {fold.seed} (recorded in {fold.record})")
    return None


def line_printer(stream=None):
    """A ``log`` for lanes running side by side: each line is written whole (``print`` writes the text and the
    newline separately, so two lanes' lines could run together)."""
    lock = threading.Lock()

    def log(text):
        with lock:
            out = stream or sys.stdout
            out.write(text + "\n")
            out.flush()
    return log


def ensure_data():
    """Write the benchmark's phantom and preprocess it (both skip what is already complete)."""
    py = sys.executable
    for cmd in ([py, "code/data/phantom.py", "--cases", str(P.n_cases), "--shape", *map(str, P.raw_shape)],
                [py, "code/data/preprocess.py", "--task", "phantom"]):
        subprocess.run(cmd, check=True, env=ENV, cwd=ROOT, stdout=subprocess.DEVNULL)


def record_finished(folds, log=print):
    """Record the folds trained and tested but not yet recorded (finished by an older runner, or killed between
    its test and its record)."""
    from benchmark_report import load_test_labels, write_record
    todo = [f for f in folds if not f.done() and not f.busy() and f.trained() and f.tested()]
    labels = load_test_labels() if todo else None
    for f in todo:
        write_record(f, labels)
        log(f"recorded {f.method} seed {f.seed} in {f.record}")


@cli_main
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", nargs="+", default=None, help="rows (default: every code/train_<m>.py + fully_all)")
    p.add_argument("--seeds", nargs="+", type=int, default=list(P.seeds))
    p.add_argument("--jobs", type=int, default=2, help="folds trained side by side (one thread each)")
    p.add_argument("--status", action="store_true", help="print what is done and left, run nothing")
    p.add_argument("--report", action="store_true", help="only evaluate, tabulate and draw what is finished")
    p.add_argument("--out", default=os.path.join(ROOT, "docs", "benchmark"), help="folder of the page")
    args = p.parse_args(argv)
    methods = args.methods or all_methods()
    unknown = [m for m in methods if m not in all_methods()]
    if unknown:
        raise ConfigError(f"--methods: unknown {', '.join(unknown)} (choose from {', '.join(all_methods())})")
    ensure_data()
    folds = plan(methods, args.seeds)
    if not args.status:
        record_finished(folds)
    if not (args.status or args.report):
        print("\n".join(status(folds, args.jobs)), flush=True)
        todo = [f for f in folds if not f.done()]
        log = line_printer()
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            errors = dict(zip(todo, pool.map(lambda f: run_fold(f, log), todo)))
        for f, err in errors.items():
            if err:
                print(f"{f.method} seed {f.seed}: {err}")
    print("\n".join(status(folds, args.jobs)))
    if not args.status:
        from benchmark_report import write_report
        write_report(methods, folds, args.out, ENV["DHC_BENCHMARK_RUNS"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
