"""Setting up a training run: seeds and RNG state, datasets and loaders, the log file. Used by ``engine.Trainer``.

Loaders are built here only: under torchrun with several processes each rank reads its own share through a
``DistributedSampler``; the labeled set repeats to the unlabeled set's length and an epoch zips both loaders
(docs/pipeline.md#loaders). Q37: docs/original-quirks.md.
"""
import logging
import os
import random
import sys

import numpy as np
import torch

from utils import distributed
from utils.io import ConfigError, DataError, read_list


def seed_everything(seed, deterministic=False):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device
    if deterministic:  # Q37: the original leaves cudnn non-deterministic
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
        torch.use_deterministic_algorithms(True, warn_only=True)


def rng_state():
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def make_loader(dataset, cfg, method, shuffle=True, epoch=0, stream=0):
    """Training loaders are built here only. Under torchrun with several processes each rank reads its own share
    through a DistributedSampler (shuffled from ``--seed`` + ``stream`` and the epoch, so labeled and unlabeled
    orders are independent); at world size 1 the stream is the plain run's RandomSampler."""
    from data.dataset import seed_worker
    sampler = None
    if distributed.world_size() > 1:
        sampler = torch.utils.data.DistributedSampler(dataset, shuffle=shuffle, seed=cfg.seed + stream,
                                                      drop_last=method.drop_last)
        sampler.set_epoch(epoch)
    return torch.utils.data.DataLoader(
        dataset, batch_size=cfg.batch_size, shuffle=shuffle if sampler is None else None, sampler=sampler,
        num_workers=cfg.num_workers, pin_memory=cfg.device.type == "cuda", worker_init_fn=seed_worker,
        drop_last=method.drop_last)


def check_iterations(cfg, method, labeled, unlabeled):
    """ConfigError unless an epoch has at least one training iteration: with drop_last (ADSH) a batch larger than
    a split's cases per process gives none, and a run would end "done" with an untrained best_model.pth. Counted
    from the loaders' lengths (no RNG is drawn)."""
    loaders = [(ds, make_loader(ds, cfg, method)) for ds in (unlabeled, labeled) if ds is not None]
    ds, loader = min(loaders, key=lambda item: len(item[1]))  # the unlabeled split first: it sets the length
    if len(loader) > 0:
        return
    per_rank, ranks = len(loader.sampler), distributed.world_size()
    why = f"an epoch would have no training iteration: {ds.split_path} gives {per_rank} samples"
    if per_rank == 0:
        raise ConfigError(f"torchrun --nproc_per_node {ranks}: {why} per process ({len(ds)} for {ranks} processes) "
                          f"and {cfg.method} drops incomplete batches; use fewer processes or a larger split")
    raise ConfigError(f"--batch_size {cfg.batch_size}: {why}{' per process' if ranks > 1 else ''}, fewer than one "
                      f"batch, and {cfg.method} drops incomplete batches; lower --batch_size to at most {per_rank} "
                      "or use a larger split")


def build_datasets(cfg, method):
    """(labeled, unlabeled or None, eval) datasets. The labeled set repeats to the unlabeled length
    (docs/pipeline.md#loaders)."""
    from data.dataset import VolumeDataset
    from data.transforms import make_eval_transform, make_train_transform
    train_tf = make_train_transform(cfg.task, cfg.patch_size, flip=not cfg.no_flip)
    unlabeled = None
    if method.uses_unlabeled:
        unlabeled = VolumeDataset(cfg.task, cfg.split_unlabeled, transform=train_tf, unlabeled=True)
    labeled = VolumeDataset(cfg.task, cfg.split_labeled, transform=train_tf,
                            repeat=len(unlabeled) if unlabeled is not None else None)
    evaluation = VolumeDataset(cfg.task, cfg.split_eval, transform=make_eval_transform(cfg.task, cfg.patch_size))
    check_no_leakage(cfg.task, labeled, unlabeled, evaluation)
    return labeled, unlabeled, evaluation


def check_no_leakage(task, labeled, unlabeled, evaluation):
    """Training cases (labeled or unlabeled) must not be eval cases, and none of them test cases (test.txt, when
    present): e.g. the original's AMOS 20 % lists hold 20 eval ids. A DataError names the files and ids."""
    test_path = task.split_path("test")
    test = set(read_list(test_path)) if os.path.isfile(test_path) else set()
    sets = [(ds.split_path, set(ds.ids), "a training") for ds in (labeled, unlabeled) if ds is not None]
    evals = (evaluation.split_path, set(evaluation.ids), "the validation")
    pairs = [(a, evals) for a in sets] + [(a, (test_path, test, "the test")) for a in sets + [evals]]
    for (path_a, ids_a, role_a), (path_b, ids_b, role_b) in pairs:
        shared = sorted(ids_a & ids_b)
        if shared and path_a == path_b:  # e.g. -se labeled_20p, or -sl test
            raise DataError(f"{path_a}: is both {role_a} split and {role_b} split; choose other -sl/-su/-se splits")
        if shared:
            raise DataError(f"{path_a}: shares {len(shared)} ids with {path_b} ({', '.join(shared[:5])}); "
                            "training on evaluation or test cases leaks them")


def setup_logging(folder):
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    for handler in list(root.handlers):
        root.removeHandler(handler)
    fmt = logging.Formatter("[%(asctime)s.%(msecs)03d] %(message)s", datefmt="%H:%M:%S")
    handlers = [logging.StreamHandler(sys.stdout)]
    if folder is not None:
        handlers.append(logging.FileHandler(os.path.join(folder, "train.log")))
    for handler in handlers:
        handler.setFormatter(fmt)
        handler._dhc_run = True
        root.addHandler(handler)


def teardown_logging():
    """Close and remove the handlers ``setup_logging`` installed (train.log is closed when a run ends)."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_dhc_run", False):
            root.removeHandler(handler)
            handler.close()
