"""Per-task settings: data locations, patch, classes, schedules.

Defaults reproduce the original's relative paths (run everything from the repository root). Each path can be
overridden by an environment variable, e.g. ``DHC_SYNAPSE_RAW=/data/Synapse DHC_SYNAPSE_DATA=/fast/synapse_data``.
See docs/pipeline.md#scripts-and-configuration (the original's utils/config.py); Qn: docs/original-quirks.md.
"""
import os
from dataclasses import dataclass
from types import MappingProxyType
from typing import Mapping, Optional, Tuple

SYNAPSE_ORGANS = ("spleen", "kidney_r", "kidney_l", "gallbladder", "esophagus", "liver", "stomach", "aorta",
                  "ivc", "portal_splenic_veins", "pancreas", "adrenal_r", "adrenal_l")
AMOS_ORGANS = ("spleen", "kidney_r", "kidney_l", "gallbladder", "esophagus", "liver", "stomach", "aorta",
               "ivc", "pancreas", "adrenal_r", "adrenal_l", "duodenum", "bladder", "prostate_uterus")

PAPER_EPOCHS = MappingProxyType({2: 200, 5: 200, 10: 200, 20: 300, 40: 300})  # train3times_seeds_<N>p.sh


@dataclass(frozen=True)
class TaskConfig:
    """Everything that differs between tasks. Arrays are (D, H, W) = (z, y, x)."""
    name: str
    raw_dir: str                  # NIfTI input of preprocessing (original: base_dir)
    data_dir: str                 # npy/ + splits/ written by preprocessing (original: save_dir)
    patch_size: Tuple[int, int, int]
    class_names: Tuple[str, ...]  # foreground organs in label-id order (id 1 first)
    raw_layout: str               # "synapse" (imagesTr/img0001, labelsTr/label0001) or "amos"
    inplane_halving: bool         # Synapse: volumes are halved in H and W before cropping and inference (Q24)
    fixed_grid: Optional[Tuple[int, int, int]]  # AMOS: every volume resized to this grid at preprocessing (Q19)
    early_stop_patience: int
    label_ratios: Tuple[int, ...]  # labeled percentages written by preprocessing
    epochs: Mapping[int, int]      # label ratio -> epochs E (the scripts' -ep)
    num_channels: int = 1
    n_filters: int = 32
    eval_every: int = 10
    flip: bool = True              # HEAD trains with flips (Q26)
    window: Tuple[float, float] = (-75.0, 275.0)  # CT intensity clip before min-max
    split_seed: int = 0
    raw_shape: Optional[Tuple[int, int, int]] = None  # phantom only: the grid code/data/phantom.py writes

    @property
    def num_cls(self) -> int:
        """Number of classes including background (Synapse 14, AMOS 16)."""
        return len(self.class_names) + 1

    @property
    def npy_dir(self) -> str:
        return os.path.join(self.data_dir, "npy")

    @property
    def splits_dir(self) -> str:
        return os.path.join(self.data_dir, "splits")

    def split_path(self, split: str) -> str:
        return os.path.join(self.splits_dir, f"{split}.txt")


def _env(task: str, kind: str, default: str) -> str:
    return os.environ.get(f"DHC_{task.upper()}_{kind}", default)


def _tasks():
    return {
        "synapse": TaskConfig(
            name="synapse", raw_dir=_env("synapse", "RAW", "./Datasets/Synapse"),
            data_dir=_env("synapse", "DATA", "./synapse_data"), patch_size=(64, 128, 128),
            class_names=SYNAPSE_ORGANS, raw_layout="synapse", inplane_halving=True, fixed_grid=None,
            early_stop_patience=100, label_ratios=(10, 20, 40), epochs=PAPER_EPOCHS),
        "amos": TaskConfig(
            name="amos", raw_dir=_env("amos", "RAW", "./Datasets/amos22"),
            data_dir=_env("amos", "DATA", "./amos_data"), patch_size=(64, 128, 128),
            class_names=AMOS_ORGANS, raw_layout="amos", inplane_halving=False, fixed_grid=(80, 160, 160),
            early_stop_patience=50, label_ratios=(2, 5, 10), epochs=PAPER_EPOCHS),
        # CPU-sized synthetic abdomen (code/data/phantom.py): Synapse layout and pipeline, written on a 32 x 128 x 128
        # grid (~3 mm pixels, ~9 mm slices) and halved in-plane to 32 x 64 x 64, so that a 16 x 48 x 48 crop holds
        # most of the abdomen's cross-section (docs/benchmark/first_pass/phantom_20p.md#protocol). Epochs sized for
        # `make demo` (three DHC seeds side by side, test, evaluation, figures) in under 10 minutes on two cores;
        # validation every 5 epochs (a centre crop of the 3 eval cases) so the last epoch is validated and curves have
        # points.
        "phantom": TaskConfig(
            name="phantom", raw_dir=_env("phantom", "RAW", "./Datasets/Phantom"),
            data_dir=_env("phantom", "DATA", "./phantom_data"), patch_size=(16, 48, 48),
            class_names=SYNAPSE_ORGANS, raw_layout="synapse", inplane_halving=True, fixed_grid=None,
            early_stop_patience=100, label_ratios=(10, 20, 40),
            epochs=MappingProxyType({2: 35, 5: 35, 10: 35, 20: 35, 40: 55}), n_filters=16, eval_every=5,
            raw_shape=(32, 128, 128)),
    }


TASK_NAMES = ("synapse", "amos", "phantom")


def get_task(name: str) -> TaskConfig:
    """The task's settings, with environment overrides read now (not at import)."""
    tasks = _tasks()
    if name not in tasks:
        raise KeyError(f"unknown task {name!r}; choose one of {', '.join(TASK_NAMES)}")
    return tasks[name]


@dataclass(frozen=True)
class BenchmarkProtocol:
    """The phantom benchmark (docs/benchmark/phantom_20p.md, run by ``make benchmark``): every method at 20 % labels
    with the three-seed scripts' ``-l 3e-2 -w 0.1 -r``, sized for a 2-core CPU.

    Its phantom is the phantom task's anatomy on a finer grid than the demo's: ``raw_shape`` 32 x 192 x 192 in its
    own ``raw_dir`` and ``data_dir`` (``$DHC_PHANTOM_RAW``/``$DHC_PHANTOM_DATA`` override them, as for every phantom
    command), halved in-plane at load time as Synapse is, so 4 mm pixels and 9-10 mm slices. On the demo's 6 mm grid
    the upper bound never learned the esophagus and the adrenals (20-50 voxels per case); the class imbalance is the
    same on every grid (liver : adrenal about 156 : 1). A 16 x 64 x 64 patch holds about half of the abdomen's
    cross-section. Every method trains for ``iterations``, the original's count at 20 % (Synapse: 301 epochs of 8
    iterations); at half of it the unweighted rows stopped where their learning rate ran out, not where they stopped
    learning (CPS: 24 validation Dice at the end of a 1,206-iteration run, 36 at iteration 1,206 of a 2,406-iteration
    one; docs/benchmark/first_pass/phantom_20p.md). The upper bound ``fully_all`` (one VNet on every training case,
    unweighted loss) trains for ``bound_iterations``, as the original trains its fully supervised VNet for longer
    (1000 epochs of 5 iterations on Synapse). Runs validate ``n_evals`` times. UNETR++ takes patch sides divisible by
    32 only and diverges at 3e-2 and 1e-2 (and once, of two runs, at 3e-3): its row runs at ``unetrpp_patch_size``
    and ``unetrpp_base_lr``, the training engine's default rate."""
    name: str = "phantom_20p"
    n_cases: int = 20
    raw_shape: Tuple[int, int, int] = (32, 192, 192)
    raw_dir: str = "Datasets/PhantomBenchmark"
    data_dir: str = "phantom_benchmark_data"
    label_ratio: int = 20
    base_lr: float = 3e-2
    cps_w: float = 0.1
    iterations: int = 2400
    bound_iterations: int = 6000
    n_evals: int = 20
    n_filters: int = 16
    patch_size: Tuple[int, int, int] = (16, 64, 64)
    unetrpp_patch_size: Tuple[int, int, int] = (32, 32, 32)
    unetrpp_base_lr: float = 1e-3  # loss overflow: 3e-2 within 30 iterations, 1e-2 after ~290, 3e-3 after ~40
    seeds: Tuple[int, ...] = (0, 1, 666)
    log_root: str = "logs/benchmark"

    def schedule(self, iters_per_epoch, iterations):
        """(max epoch E, eval_every V): about ``iterations`` iterations in E + 1 epochs, ``n_evals`` validations,
        the last epoch validated (validation runs when epoch % V == 0)."""
        every = max(1, round(iterations / (self.n_evals * iters_per_epoch)))
        return every * max(1, round(iterations / (every * iters_per_epoch))), every


BENCHMARK = BenchmarkProtocol()
