"""The shared loop on a tiny on-disk dataset: files written, resume equality, bad input, learning progress.
Qn: docs/original-quirks.md."""
import json
import os

import pytest
import torch

import engine
from conftest import FAST, last_nets
from train_dhc import DHC
from train_fully import Fully


def test_dhc_run_writes_original_files_and_run_json(tiny_data):
    engine.run(DHC, FAST + ["--exp", "r", "-ep", "1"])
    folder = tiny_data / "logs" / "r"
    best = torch.load(folder / "ckpts" / "best_model.pth", weights_only=True)
    assert set(best) == {"A", "B"} and len(best["A"]) == 205
    info = json.loads((folder / "run.json").read_text())
    assert info["method"] == "dhc" and info["checkpoint_keys"] == ["A", "B"]
    assert info["network"] == {"name": "VNet", "n_channels": 1, "n_classes": 14, "n_filters": 4,
                               "normalization": "batchnorm"}
    assert info["args"]["split_unlabeled"] == "unlabeled_20p"  # derived from -sl (Q8)
    assert info["args"]["base_lr"] == 3e-2 and info["args"]["cps_w"] == 0.1 and info["args"]["cps_rampup"]
    log = (folder / "train.log").read_text()
    assert "validation epoch 0" in log and "validation epoch 1" in log and "class_weights/B" in log
    assert any(f.startswith("events") for f in os.listdir(folder / "tensorboard"))
    last = torch.load(folder / "ckpts" / "last.pth", weights_only=False)
    assert last["epoch"] == 1 and set(last["method"]) >= {"diff_dw", "dist_dw"}


def test_resume_gives_identical_weights(tiny_data, monkeypatch):
    engine.run(DHC, FAST + ["--exp", "straight", "-ep", "3"])
    original_save = engine.Trainer.save_last

    def save_then_die(self, epoch):
        original_save(self, epoch)
        if epoch == 1:
            raise KeyboardInterrupt  # killed after epoch 1 was saved

    monkeypatch.setattr(engine.Trainer, "save_last", save_then_die)
    with pytest.raises(SystemExit, match="^130$"):  # Ctrl-C: "interrupted", exit 130
        engine.run(DHC, FAST + ["--exp", "resumed", "-ep", "3"])
    monkeypatch.setattr(engine.Trainer, "save_last", original_save)
    engine.run(DHC, FAST + ["--exp", "resumed", "-ep", "3", "--resume"])
    a, b = last_nets(tiny_data, "straight"), last_nets(tiny_data, "resumed")
    for net in ("A", "B"):
        for key in a[net]:
            assert torch.equal(a[net][key], b[net][key]), (net, key)


def test_bad_split_is_one_line_error_and_writes_nothing(tiny_data, capsys):
    with pytest.raises(SystemExit) as exit_info:
        engine.run(DHC, FAST + ["--exp", "bad", "-sl", "labeled_5p"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "labeled_5p.txt" in err and "\n" not in err
    assert not (tiny_data / "logs" / "bad").exists()


def test_unknown_task_lists_choices(tiny_data, capsys):
    with pytest.raises(SystemExit):
        engine.run(DHC, ["--task", "brats"])
    assert "phantom" in capsys.readouterr().err


def test_fully_trains_on_labeled_only_with_bare_checkpoint(tiny_data):
    engine.run(Fully, FAST + ["--exp", "f", "-ep", "1", "-sl", "train", "-w", "0.3", "-r"])
    best = torch.load(tiny_data / "logs" / "f" / "ckpts" / "best_model.pth", weights_only=True)
    assert "out_conv.weight" in best and len(best) == 205  # bare state dict
    info = json.loads((tiny_data / "logs" / "f" / "run.json").read_text())
    assert info["checkpoint_keys"] is None and info["args"]["batch_size"] == 4


def test_dhc_learns_on_easy_blobs(tiny_data):
    """A few CPU epochs raise the validation Dice above its epoch-0 value."""
    best = engine.run(DHC, FAST + ["--exp", "learn", "-ep", "6", "--n_filters", "8"])
    log = (tiny_data / "logs" / "learn" / "train.log").read_text()
    first = float(log.split("validation epoch 0: mean dice ")[1].split()[0])
    spleen = [float(line.split("spleen ")[1].split()[0]) for line in log.splitlines() if "validation epoch" in line]
    assert best > first + 0.02
    assert spleen[0] < 0.3 and max(spleen) > 0.5  # the large class 1 is really learned


def test_dhc_learns_the_liver_on_a_tiny_phantom(tmp_path, monkeypatch):
    """A few CPU epochs on the real phantom (reduced grid) raise the validation Dice above epoch 0's."""
    from data.phantom import write_dataset
    from data.preprocess import preprocess
    for key, sub in (("DHC_PHANTOM_RAW", "raw"), ("DHC_PHANTOM_DATA", "data"), ("DHC_LOG_ROOT", "logs")):
        monkeypatch.setenv(key, str(tmp_path / sub))
    write_dataset(tmp_path / "raw", n_cases=10, seed=0, shape=(24, 64, 64), progress=False)
    preprocess("phantom", progress=False)
    best = engine.run(DHC, ["--task", "phantom", "--exp", "p", "-ep", "12", "--patch_size", "16", "32", "32",
                            "--eval_every", "3", "-sl", "labeled_40p", "--device", "cpu", "--n_filters", "8"])
    lines = [line for line in (tmp_path / "logs" / "p" / "train.log").read_text().splitlines()
             if "validation epoch" in line]
    first = float(lines[0].split("mean dice ")[1].split()[0])
    liver = [float(line.split(" liver ")[1].split()[0]) for line in lines]
    assert len(lines) == 5 and best > first + 0.02
    assert liver[0] < 0.1 and max(liver) > 0.4  # the largest organ is learned first


class EveryOtherStep(engine.Method):
    """Three parameters: ``a`` in every loss, ``b`` only at even iterations, ``c`` never (DST's pseudo decoder)."""

    def __init__(self):
        super().__init__(cfg=None)
        net = torch.nn.Module()
        for name, value in (("a", 1.0), ("b", -2.0), ("c", 3.0)):
            net.register_parameter(name, torch.nn.Parameter(torch.full((2,), value)))
        self.nets = {"m": net}

    def training_step(self, x_l, y_l, x_u, step):
        net = self.nets["m"]
        loss = (net.a ** 2).sum() + ((net.b ** 2).sum() if step.it % 2 == 0 else 0)
        return {"loss": loss}


def sgd_with_zero_grad(param, momentum_buffer, lr):
    """One step of the engine's SGD on a copy of ``param`` whose gradient is an explicit zero tensor."""
    p = torch.nn.Parameter(param.detach().clone())
    opt = torch.optim.SGD([p], lr=lr, momentum=0.9, weight_decay=3e-5, nesterov=True)
    p.grad = torch.zeros_like(p)
    opt.state[p]["momentum_buffer"] = momentum_buffer.clone()
    opt.step()
    return p.detach()


def test_zero_grad_keeps_zero_tensors_so_sgd_moves_a_parameter_without_gradient():
    """PyTorch 1.8's zero_grad (the original's): a parameter that once had a gradient keeps a zero tensor, so weight
    decay and Nesterov momentum move it on the iterations it gets no gradient; one that never had a gradient stays
    untouched (docs/pipeline.md#schedules). ``set_to_none=True`` would leave b frozen at iteration 1."""
    import types
    method = EveryOtherStep()
    net, lr = method.nets["m"], 0.1
    opts = engine.make_optimizers(method, lr)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    cfg = types.SimpleNamespace(device=torch.device("cpu"), amp=False)
    step = lambda it: engine.Step(0, it, it, lr, 1.0)  # noqa: E731
    engine.optimize_step(method, opts, scaler, cfg, None, None, None, step(0))  # b gets a gradient
    b1, buf1 = net.b.detach().clone(), opts["m"].state[net.b]["momentum_buffer"].clone()
    saved = engine.grads_defined(method.nets)
    assert saved == {"m": ["a", "b"]}
    engine.optimize_step(method, opts, scaler, cfg, None, None, None, step(1))  # b gets none
    expected = sgd_with_zero_grad(b1, buf1, lr)
    assert not torch.equal(net.b.detach(), b1)
    assert torch.equal(net.b.detach(), expected)
    assert torch.equal(net.b.grad, torch.zeros(2))  # a zero tensor, not None
    assert net.c.grad is None and torch.equal(net.c.detach(), torch.full((2,), 3.0))

    # a resumed run restores the zero tensors from last.pth's "grads_defined": the same update at iteration 1
    fresh = EveryOtherStep()
    fresh.nets["m"].load_state_dict({"a": torch.ones(2), "b": b1, "c": net.c.detach()})
    fresh_opts = engine.make_optimizers(fresh, lr)
    engine.restore_grads_defined(fresh.nets, saved)
    fresh_opts["m"].state[fresh.nets["m"].b]["momentum_buffer"] = buf1.clone()
    assert fresh.nets["m"].c.grad is None
    engine.optimize_step(fresh, fresh_opts, scaler, cfg, None, None, None, step(1))
    assert torch.equal(fresh.nets["m"].b.detach(), expected)
