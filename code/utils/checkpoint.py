"""The networks of a trained run, ready for inference: from a run folder (``run.json`` + ``ckpts/best_model.pth``)
or from a checkpoint alone (the authors' released files), for ``code/test.py`` and ``code/predict.py``.

See docs/pipeline.md#networks and #sliding-window-inference; quirks (docs/original-quirks.md) Q43 (architecture from
run.json, --cps A|B|AB) and Q44 (checkpoint loaded once with map_location).
"""
import glob
import json
import logging
import os
from dataclasses import dataclass

import torch

from utils.inference import prepare_net
from utils.io import ConfigError, DataError, checkpoint_problem, exp_dir

log = logging.getLogger(__name__)

# Fallback without run.json, for released checkpoints: the original picks the network by substring of --exp,
# tested in this order (Q43); anything else is two VNets. predict.py applies the same rule to --method.
EXP_NAME_RULES = (("fully", "VNet"), ("dst", "VNet_Decoupled"), ("urpc", "unet_3D_ds"), ("uamt", "VNet"),
                  ("acisis", "VNet"), ("ssnet", "VNet4SSNet"), ("unetrpp", "UNETR_PP"))
DEFAULT_NETWORK = "VNet"
FIXED_N_FILTERS = {"unet_3D_ds": 16}  # the original builds URPC's U-Net at 16 filters on every task
STEM_WIDTH = {"UNETR_PP": 2}  # channels of the first convolution per n_filters (1 for the others)


@dataclass(frozen=True)
class RunNets:
    """Eval-mode ``nets`` (their logits are averaged) with the network record ``spec`` (name, n_channels,
    n_classes, n_filters, normalization, patch_size), the checkpoint's layout ``layout`` ([None] = bare state dict,
    else its net names), the selected ``keys`` and the checkpoint ``path``."""
    nets: list
    spec: dict
    layout: list
    keys: list
    path: str

    @property
    def patch_size(self):
        return tuple(self.spec["patch_size"])


def build_network(name, n_channels, n_classes, n_filters, normalization="batchnorm", has_dropout=False,
                  patch_size=None):
    """``models.build_network``, imported on use."""
    from models import build_network as build
    return build(name, n_channels, n_classes, n_filters, normalization=normalization, has_dropout=has_dropout,
                 patch_size=patch_size)


def network_by_name(name):
    """The network of an experiment or method name by the original's substring rule (EXP_NAME_RULES, Q43)."""
    return next((n for key, n in EXP_NAME_RULES if key in name), DEFAULT_NETWORK)


def method_names():
    """Every method of this repository: the ``<m>`` of each ``code/train_<m>.py``."""
    code = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return sorted(os.path.basename(p)[len("train_"):-len(".py")] for p in glob.glob(os.path.join(code, "train_*.py")))


def read_run_config(task, exp):
    """(network kwargs, checkpoint keys or None if unknown, patch size) from ``run.json``, or from the
    experiment's name without it (released checkpoints, Q43)."""
    net = {"n_channels": task.num_channels, "n_classes": task.num_cls, "n_filters": task.n_filters,
           "normalization": "batchnorm"}
    path = os.path.join(exp_dir(exp), "run.json")
    if not os.path.isfile(path):
        name = network_by_name(exp)
        log.info("no run.json in %s: network %s chosen from the experiment name", exp_dir(exp), name)
        return dict(net, name=name, n_filters=FIXED_N_FILTERS.get(name, task.n_filters)), None, \
            tuple(task.patch_size)
    try:
        with open(path) as f:
            run = json.load(f)
        network = run["network"]
        net.update({k: network[k] for k in ("n_channels", "n_classes", "n_filters", "normalization")
                    if k in network}, name=network["name"])
        keys = run.get("checkpoint_keys")
        keys = [None] if keys is None else [str(k) for k in keys]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"{path}: unreadable run config ({type(e).__name__}: {e})") from None
    if run.get("task", task.name) != task.name:
        raise ConfigError(f"{path}: run trained on task {run['task']!r}, but --task is {task.name!r}")
    if net["n_classes"] != task.num_cls:
        raise ConfigError(f"{path}: network has {net['n_classes']} classes, task {task.name} has {task.num_cls}")
    return net, keys, tuple(run.get("patch_size") or task.patch_size)


def load_checkpoint(path, expected_keys=None):
    """{key: state dict} ({None: sd} for a bare state dict, the original's single-net layout), loaded once on
    the CPU (Q44); ``expected_keys`` (run.json's checkpoint_keys) must match the file's layout."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: checkpoint not found (train the run first)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle, zip and weights-only errors have no common base class
        raise DataError(f"{path}: unreadable checkpoint: {checkpoint_problem(path, e)}") from None
    if isinstance(ckpt, dict) and ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        nets = {None: ckpt}
    elif isinstance(ckpt, dict) and ckpt and all(isinstance(v, dict) for v in ckpt.values()):
        nets = {str(k): v for k, v in sorted(ckpt.items())}
    else:
        raise DataError(f"{path}: expected a state dict or a dict of state dicts (the original's {{'A', 'B'}})")
    if expected_keys is not None and sorted(nets, key=str) != sorted(expected_keys, key=str):
        raise DataError(f"{path}: run.json expects {_layout(expected_keys)}, the file has {_layout(nets)}")
    return nets


def _layout(keys):
    keys = list(keys)
    return "a bare state dict" if keys == [None] else "nets " + ", ".join(keys)


def select_nets(ckpt, cps, path):
    """Checkpoint keys to run: a bare state dict ignores --cps (as the original); AB (or no --cps) = every net,
    logits averaged; A / B = that net alone (the original crashed there, Q43)."""
    if None in ckpt:
        return [None]
    if cps in ("A", "B"):
        if cps not in ckpt:
            raise DataError(f"{path}: no net {cps!r} in the checkpoint (has {', '.join(ckpt)})")
        return [cps]
    return list(ckpt)


def state_dict_mismatch(expected, found):
    """One-line summary of why ``found`` does not fit a network whose state dict is ``expected``."""
    for key, value in expected.items():
        if key in found and tuple(found[key].shape) != tuple(value.shape):
            return f"{key} has shape {list(found[key].shape)}, expected {list(value.shape)}"
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    parts = [f"{len(missing)} missing keys (e.g. {missing[0]})"] if missing else []
    parts += [f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})"] if unexpected else []
    return ", ".join(parts)


def load_net(spec, state_dict, where, device):
    """Eval-mode network of ``spec`` with ``state_dict`` (strict); a mismatch is a one-line DataError."""
    kwargs = {k: v for k, v in spec.items() if k != "name"}
    try:
        net = build_network(spec["name"], has_dropout=False, **kwargs)
    except (KeyError, ValueError, NotImplementedError) as e:
        raise ConfigError(f"{where}: cannot build network {spec['name']!r} ({e})") from None
    problem = state_dict_mismatch(net.state_dict(), state_dict)
    if problem:
        raise DataError(f"{where}: not a {spec['name']} checkpoint for {spec['n_classes']} classes ({problem})")
    net.load_state_dict(state_dict, strict=True)
    return prepare_net(net, device)


def _load_selected(spec, ckpt, cps, path, device):
    keys = select_nets(ckpt, cps, path)
    nets = [load_net(spec, ckpt[k], path if k is None else f"{path}['{k}']", device) for k in keys]
    return RunNets(nets=nets, spec=spec, layout=list(ckpt), keys=keys, path=path)


def load_run_nets(task, exp, cps, device):
    """The nets of run ``exp``: network, width and patch from its ``run.json`` (or the experiment-name rule),
    weights from ``ckpts/best_model.pth``; ``cps`` as in ``select_nets``."""
    spec, expected_keys, patch_size = read_run_config(task, exp)
    path = os.path.join(exp_dir(exp), "ckpts", "best_model.pth")
    ckpt = load_checkpoint(path, expected_keys)
    # patch_size sizes UNETR_PP's positional embeddings; the other networks ignore it
    return _load_selected(dict(spec, patch_size=tuple(patch_size)), ckpt, cps, path, device)


def checkpoint_width(name, state_dict, path):
    """n_filters of a ``name`` network read from its weights: the output channels of the first 5-D weight (the
    stem convolution) divided by STEM_WIDTH (UNETR_PP's stem has 2·n_filters channels)."""
    stem = next((v for v in state_dict.values() if getattr(v, "ndim", 0) == 5), None)
    if stem is None:
        raise DataError(f"{path}: no 3-D convolution weight in the checkpoint; pass --n_filters")
    width, rest = divmod(int(stem.shape[0]), STEM_WIDTH.get(name, 1))
    if rest or width < 1:
        raise DataError(f"{path}: first convolution has {stem.shape[0]} channels, not a {name} width; "
                        "pass --n_filters")
    return width


def load_released_nets(task, path, method, cps, device, n_filters=None, patch_size=None):
    """The nets of a checkpoint without ``run.json`` (the authors' released ``best_model.pth``): the network of
    ``method`` by the experiment-name rule (the table test.py falls back on), ``n_filters`` given or read from the
    weights (``checkpoint_width``), the task's patch unless ``patch_size`` is given."""
    if method not in method_names():
        raise ConfigError(f"--method {method!r}: unknown; choose one of {', '.join(method_names())}")
    ckpt = load_checkpoint(path)
    name = network_by_name(method)
    if n_filters is None:
        n_filters = checkpoint_width(name, next(iter(ckpt.values())), path)
    elif n_filters < 1:
        raise ConfigError(f"--n_filters {n_filters}: must be >= 1")
    spec = {"name": name, "n_channels": task.num_channels, "n_classes": task.num_cls, "n_filters": int(n_filters),
            "normalization": "batchnorm", "patch_size": tuple(patch_size or task.patch_size)}
    return _load_selected(spec, ckpt, cps, path, device)
