"""The AMP path on the CPU (``--amp``: fp16 autocast + GradScaler, as on CUDA; for testing, not for speed): every
method trains two iterations with finite fp32 losses and stepped optimisers, last.pth holds the scaler, best_model.pth
stays float32, and ``--resume`` under AMP is exact. Softmax, log, exp and sums run in fp32 as CUDA autocast runs them
(``utils.device.at_least_fp32``), so the losses do not depend on the device's autocast lists
(docs/pipeline.md#schedules)."""
import shutil

import pytest
import torch

import engine
from conftest import FAST, METHODS
from test_methods_common import EXTRA_FLAGS, method_class
from utils.io import write_list

INIT_SCALE = 2.0 ** 10  # GradScaler's default 2^16 overflows the first fp16 gradients at these sizes (a skipped step)
SMALL = ["--n_filters", "2", "--patch_size", "16", "16", "32"]  # fp16 convolutions are slow on the CPU


@pytest.fixture
def amp_flags(tiny_data, monkeypatch):
    """One iteration per epoch (2 unlabeled cases), epochs 0 and 1, validation at epoch 0; a GradScaler starting at
    INIT_SCALE."""
    write_list(tiny_data / "data" / "splits" / "unlabeled_amp.txt", ["0003", "0004"])
    real = torch.amp.GradScaler
    monkeypatch.setattr(torch.amp, "GradScaler", lambda *a, **k: real(*a, **{"init_scale": INIT_SCALE, **k}))
    return FAST + SMALL + ["--amp", "-sl", "labeled_20p", "-su", "unlabeled_amp", "-ep", "1", "--eval_every", "2"]


def checkpoint(root, exp, name="last.pth"):
    return torch.load(root / "logs" / exp / "ckpts" / name, weights_only=name != "last.pth")


@pytest.mark.parametrize("name", METHODS)
def test_amp_on_the_cpu_trains_checkpoints_and_resumes_exactly(name, tiny_data, amp_flags, monkeypatch):
    cls, logs = method_class(name), tiny_data / "logs"
    flags = amp_flags + EXTRA_FLAGS.get(name, [])
    outs, real_step, real_save = [], engine.optimize_step, engine.Trainer.save_last

    def save_and_copy_epoch_0(self, epoch):  # the run folder as a run stopped after epoch 0 leaves it
        real_save(self, epoch)
        if epoch == 0:
            shutil.copytree(logs / "straight", logs / "resumed", ignore=shutil.ignore_patterns(".lock"))

    monkeypatch.setattr(engine, "optimize_step", lambda *a, **k: outs.append(real_step(*a, **k)) or outs[-1])
    monkeypatch.setattr(engine.Trainer, "save_last", save_and_copy_epoch_0)
    engine.run(cls, flags + ["--exp", "straight"])
    assert len(outs) == 2 and all(out is not None for out in outs)  # None: a non-finite loss, step skipped
    for out in outs:
        assert out["loss"].dtype == torch.float32 and torch.isfinite(out["loss"]), out
    last = checkpoint(tiny_data, "straight")
    assert last["scaler"]["scale"] == INIT_SCALE and last["scaler"]["_growth_tracker"] == 2  # two unskipped steps
    for opt in last["optimizers"].values():
        assert opt["state"] and all("momentum_buffer" in s for s in opt["state"].values())  # SGD stepped
    best = checkpoint(tiny_data, "straight", "best_model.pth")
    tensors = list(best.values()) if cls.bare_checkpoint else [t for net in best.values() for t in net.values()]
    assert tensors and all(t.dtype == torch.float32 for t in tensors if t.is_floating_point())

    monkeypatch.setattr(engine.Trainer, "save_last", real_save)
    assert checkpoint(tiny_data, "resumed")["epoch"] == 0
    engine.run(cls, flags + ["--exp", "resumed", "--resume"])
    resumed = checkpoint(tiny_data, "resumed")
    assert len(outs) == 3 and resumed["scaler"] == last["scaler"]
    for net, sd in last["nets"].items():
        for key, value in sd.items():
            assert torch.equal(value, resumed["nets"][net][key]), (name, net, key)


def test_losses_under_cpu_autocast_compute_what_cuda_autocast_computes():
    """CUDA autocast runs softmax, log, exp and sums of fp16 logits in fp32; these losses now do so explicitly, so
    under CPU fp16 autocast they equal the fp32 computation on the fp16 logits, bit for bit (before, CPU autocast ran
    them in fp16 and URPC's log(softmax) was -inf)."""
    from train_dst import WorstCaseEstimationLoss
    from train_uamt import softmax_mse_loss
    from train_urpc import deep_supervision_loss, uncertainty_rectified_loss
    from utils.loss import DC_and_CE_loss, SoftDiceLoss, softmax_helper
    g = torch.Generator().manual_seed(0)
    logits = [(6 * torch.randn(2, 5, 2, 4, 4, generator=g)).half() for _ in range(4)]
    y = torch.randint(0, 5, (2, 1, 2, 4, 4), generator=g)
    losses = {
        "DC_and_CE_loss": lambda z: DC_and_CE_loss(w_dc=torch.arange(5.0), w_ce=torch.arange(5.0))(z[0], y),
        "SoftDiceLoss": lambda z: SoftDiceLoss(apply_nonlin=softmax_helper, do_bg=True)(z[0], y),
        "urpc supervised": lambda z: deep_supervision_loss(z, y),
        "urpc consistency": lambda z: uncertainty_rectified_loss(z),
        "uamt mse": lambda z: softmax_mse_loss(z[0], z[1]).sum(),
        "dst worst case": lambda z: WorstCaseEstimationLoss()(*z),
    }
    for name, loss in losses.items():
        with torch.autocast("cpu", dtype=torch.float16):
            under_autocast = loss(logits)
        fp32 = loss([z.float() for z in logits])
        assert torch.isfinite(fp32) and torch.equal(under_autocast, fp32), name
