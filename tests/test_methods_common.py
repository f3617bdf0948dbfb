"""What every method script must do, checked for each ``code/train_<m>.py`` (new methods are picked up by name):
import without side effects, record the network it trained, resume bit-identically, reject bad flags in one line.
Also the shared two-net base (``cotraining.CoTraining``)."""
import importlib
import inspect
import json
import os
import subprocess
import sys

import pytest
import torch

import engine
from cotraining import CoTraining
from conftest import FAST, METHODS, REPO, last_nets

# Flags a method needs on the tiny data beyond FAST (e.g. a backbone with its own patch constraints).
EXTRA_FLAGS = {"dhc_unetrpp": ["--patch_size", "32", "32", "32"],  # UNETR++: every axis a multiple of 32
               "adsh": ["--adsh_bank", "4"]}  # a bank that fills and re-estimates within two epochs


def method_class(name):
    """The ``engine.Method`` subclass defined in ``train_<name>.py``."""
    module = importlib.import_module(f"train_{name}")
    found = [c for _, c in inspect.getmembers(module, inspect.isclass)
             if issubclass(c, engine.Method) and c.__module__ == module.__name__]
    assert len(found) == 1, f"train_{name}.py defines {len(found)} Method classes"
    return found[0]


def flags(name, exp, epochs):
    return FAST + EXTRA_FLAGS.get(name, []) + ["--exp", exp, "-ep", str(epochs), "--eval_every", "2"]


@pytest.mark.parametrize("name", METHODS)
def test_import_parses_nothing_and_touches_no_file(name, tmp_path):
    code = (f"import sys; sys.argv = ['x', '--bogus']; import train_{name}; "
            f"import os; assert os.listdir('.') == [], os.listdir('.')")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.join(REPO, "code"), REPO]))
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]


@pytest.mark.parametrize("name", METHODS)
def test_resume_is_bit_identical(name, tiny_data, monkeypatch):
    """4 epochs straight == 2 epochs, a crash after last.pth of epoch 1 is written, then --resume (CPU)."""
    cls = method_class(name)
    engine.run(cls, flags(name, "straight", 3))
    original_save = engine.Trainer.save_last

    def save_then_die(self, epoch):
        original_save(self, epoch)
        if epoch == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(engine.Trainer, "save_last", save_then_die)
    with pytest.raises(SystemExit, match="^130$"):  # Ctrl-C: "interrupted", exit 130
        engine.run(cls, flags(name, "resumed", 3))
    monkeypatch.setattr(engine.Trainer, "save_last", original_save)
    engine.run(cls, flags(name, "resumed", 3) + ["--resume"])
    a, b = last_nets(tiny_data, "straight"), last_nets(tiny_data, "resumed")
    assert set(a) == set(b)
    for net in a:
        for key in a[net]:
            assert torch.equal(a[net][key], b[net][key]), (name, net, key)
    state_a = torch.load(tiny_data / "logs" / "straight" / "ckpts" / "last.pth", weights_only=False)["method"]
    state_b = torch.load(tiny_data / "logs" / "resumed" / "ckpts" / "last.pth", weights_only=False)["method"]
    assert_same_state(state_a, state_b, name)

    info = json.loads((tiny_data / "logs" / "straight" / "run.json").read_text())
    assert info["method"] == name and info["network"]["name"] == cls.network
    best = torch.load(tiny_data / "logs" / "straight" / "ckpts" / "best_model.pth", weights_only=True)
    if cls.bare_checkpoint:
        assert info["checkpoint_keys"] is None and all(torch.is_tensor(v) for v in best.values())
    else:
        assert sorted(best) == info["checkpoint_keys"]


def assert_same_state(a, b, where):
    """Method state (weights, EMAs, banks, counters) equal after a resume, tensors exactly."""
    if torch.is_tensor(a):
        assert torch.is_tensor(b) and a.shape == b.shape and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert set(a) == set(b), where
        for key in a:
            assert_same_state(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_state(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


@pytest.mark.parametrize("name", METHODS)
def test_bad_flag_is_one_error_line(name, tiny_data, capsys):
    with pytest.raises(SystemExit) as info:
        engine.run(method_class(name), FAST + ["--exp", "bad", "--device", "tpu"])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "--device" in err and "\n" not in err


# ------------------------------------------------------------------------------------------ co-training base

class PlainCPS(CoTraining):
    """The base alone, unweighted: plain CPS."""
    name = "plain_cps"

    def training_step(self, x_l, y_l, x_u, step):
        logits_a, logits_b, n_l = self.forward_both(x_l, x_u)
        loss_sup, loss_cps = self.cps_pair(logits_a, logits_b, y_l, n_l)
        return {"loss": loss_sup + step.unsup_w * loss_cps}


def make_method(cls=PlainCPS, extra=()):
    from utils.runinfo import build_parser, resolve_config
    torch.manual_seed(0)
    return cls(resolve_config(cls, build_parser(cls).parse_args(FAST + ["--task", "phantom", *extra])))


def tiny_batch(num_cls=14):
    g = torch.Generator().manual_seed(1)
    x_l, x_u = torch.rand(2, 1, 16, 32, 32, generator=g), torch.rand(2, 1, 16, 32, 32, generator=g)
    return x_l, torch.randint(0, num_cls, (2, 1, 16, 32, 32), generator=g), x_u


def test_cotraining_init_kaiming_a_xavier_b_deconvs_untouched():
    from models import build_network
    torch.manual_seed(0)
    reference = [m.weight.clone() for m in build_network("VNet", 1, 14, 4, has_dropout=True).modules()
                 if isinstance(m, torch.nn.ConvTranspose3d)]
    method = make_method()  # seeds 0, then draws A's default init first
    conv_a = method.nets["A"].block_five.conv[0].weight   # [16F, 16F, 3, 3, 3], F = 4
    conv_b = method.nets["B"].block_five.conv[0].weight
    fan_in, fan_out = 64 * 27, 64 * 27
    assert conv_a.std().item() == pytest.approx((2 / fan_in) ** 0.5, rel=0.05)                 # kaiming fan_in
    assert conv_b.std().item() == pytest.approx((2 / (fan_in + fan_out)) ** 0.5, rel=0.05)     # xavier gain 1
    bn = method.nets["B"].block_five.conv[1]
    assert torch.equal(bn.weight, torch.ones_like(bn.weight)) and torch.equal(bn.bias, torch.zeros_like(bn.bias))
    # up-convolutions keep PyTorch's default init: A's are the first net's default draws under the same seed
    deconvs_a = [m.weight for m in method.nets["A"].modules() if isinstance(m, torch.nn.ConvTranspose3d)]
    assert all(torch.equal(a, r) for a, r in zip(deconvs_a, reference)) and len(deconvs_a) == 4


def test_nets_are_initialised_after_placement_on_the_device():
    """The original builds a net, moves it (``.cuda()``), then initialises it: the init draws come from the device's
    generator. On the CPU that is today's weights and stream, bit for bit (reference: build both, then initialise
    both on the CPU); on another device (the meta device here, which draws nothing) the CPU stream after building
    holds only the two nets' default-init draws (docs/pipeline.md#initialisation)."""
    from models import build_network
    from utils.init import kaiming_normal_init_weight, xavier_normal_init_weight
    torch.manual_seed(0)
    ref_a, ref_b = (build_network("VNet", 1, 14, 4, has_dropout=True) for _ in range(2))
    kaiming_normal_init_weight(ref_a), xavier_normal_init_weight(ref_b)
    ref_next = torch.rand(3)
    method = make_method()  # seeds 0; CPU
    for net, ref in ((method.nets["A"], ref_a), (method.nets["B"], ref_b)):
        assert all(torch.equal(v, ref.state_dict()[k]) for k, v in net.state_dict().items())
    assert torch.equal(torch.rand(3), ref_next)

    torch.manual_seed(0)
    [build_network("VNet", 1, 14, 4, has_dropout=True) for _ in range(2)]  # default init only
    defaults_only_next = torch.rand(3)
    method = make_method(extra=["--device", "meta"])
    assert method.nets["A"].block_one.conv[0].weight.device.type == "meta"
    assert torch.equal(torch.rand(3), defaults_only_next)


def test_pseudo_labels_carry_no_gradient():
    method = make_method()
    x_l, y_l, x_u = tiny_batch()
    logits_a, logits_b, n_l = method.forward_both(x_l, x_u)
    assert n_l == 2 and logits_a.shape == (4, 14, 16, 32, 32)
    _, _ = method.cps_pair(logits_a, logits_b, y_l, n_l)
    ce_a_only = method.cps_losses["A"](logits_a, logits_b.detach().argmax(1, keepdim=True))
    ce_a_only.backward()
    assert all(p.grad is None for p in method.nets["B"].parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in method.nets["A"].parameters())


def test_identical_nets_give_twice_the_self_cross_entropy():
    method = make_method()
    method.nets["B"].load_state_dict(method.nets["A"].state_dict())
    for net in method.nets.values():
        net.eval()
    x_l, y_l, x_u = tiny_batch()
    with torch.no_grad():
        logits_a, logits_b, n_l = method.forward_both(x_l, x_u)
        _, loss_cps = method.cps_pair(logits_a, logits_b, y_l, n_l)
        expected = 2 * torch.nn.functional.cross_entropy(logits_a, logits_a.argmax(1))
    assert loss_cps.item() == pytest.approx(expected.item(), rel=1e-6)


def test_class_weights_reach_both_losses_of_one_net():
    method = make_method()
    x_l, y_l, x_u = tiny_batch()
    w = torch.arange(14, dtype=torch.float32)
    with torch.no_grad():
        logits_a, logits_b, n_l = method.forward_both(x_l, x_u)
        method.cps_pair(logits_a, logits_b, y_l, n_l, w_a=w)
    assert torch.equal(method.sup_losses["A"].ce.weight, w) and torch.equal(method.cps_losses["A"].weight, w)
    assert method.sup_losses["B"].ce.weight is None and method.cps_losses["B"].weight is None


def test_lambda_zero_gives_the_supervised_loss_only():
    method = make_method()
    x_l, y_l, x_u = tiny_batch()
    torch.manual_seed(3)
    out = method.training_step(x_l, y_l, x_u, engine.Step(0, 0, 0, 0.01, 0.0))
    torch.manual_seed(3)
    logits_a, logits_b, n_l = method.forward_both(x_l, x_u)
    sup = method.sup_losses["A"](logits_a[:2], y_l) + method.sup_losses["B"](logits_b[:2], y_l)
    assert out["loss"].item() == pytest.approx(sup.item(), rel=1e-6)
