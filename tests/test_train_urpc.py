"""URPC: the deep-supervision loss and the uncertainty-rectified pyramid consistency against hand computations,
the gradient through the (undetached) mean, the method's width default, and test.py on a trained run."""
import importlib.util
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import engine
from conftest import FAST
from models import build_network
from train_urpc import URPC, deep_supervision_loss, uncertainty_rectified_loss
from utils.inference import prepare_case, sliding_window_predict
from utils.io import write_list
from utils.runinfo import build_parser, resolve_config
from utils.task import REPO_ROOT, get_task


def logits(seed, shape=(2, 3, 2, 3, 4), scale=2.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale


def consistency_by_hand(outs):
    """(U2)-(U3) voxel by voxel in numpy float64: v = Σ_c p̄ (log p̄ − log p_k), e = exp(−v),
    L_k = mean_{b,c,v}((p̄ − p_k)² e) / (mean_{b,v} e + 1e-8) + mean_{b,v} v; L = mean_k L_k."""
    probs = [np.exp(o) / np.exp(o).sum(1, keepdims=True) for o in (o.numpy() for o in outs)]
    mean = sum(probs) / 4
    total = 0.0
    for p in probs:
        v = (mean * (np.log(mean) - np.log(p))).sum(1, keepdims=True)
        e = np.exp(-v)
        total += ((mean - p) ** 2 * e).mean() / (e.mean() + 1e-8) + v.mean()
    return total / 4


def test_consistency_matches_hand_computation():
    outs = [logits(k) for k in range(4)]
    got = uncertainty_rectified_loss(outs)
    assert got.item() == pytest.approx(consistency_by_hand(outs), rel=1e-6)
    assert got.item() > 0


def test_kl_weighting_matters():
    # the same four outputs with the exp(-v) weights forced to 1 give mean((p̄-p_k)²) + mean(v): different
    outs = [logits(k) for k in range(4)]
    probs = [torch.softmax(o, 1) for o in outs]
    mean = sum(probs) / 4
    unweighted = sum(((mean - p) ** 2).mean() + (mean * (mean.log() - p.log())).sum(1).mean() for p in probs) / 4
    assert abs(uncertainty_rectified_loss(outs).item() - unweighted.item()) > 1e-4


def test_identical_heads_give_zero_consistency_and_half_the_single_supervised_loss():
    o = logits(5)
    assert abs(uncertainty_rectified_loss([o, o, o, o]).item()) < 1e-6  # v = 0, e = 1, p̄ = p_k
    y = torch.randint(0, 3, (2, 1, 2, 3, 4), generator=torch.Generator().manual_seed(6))
    single = F.cross_entropy(o, y[:, 0]) + dice_by_hand(torch.softmax(o, 1), y)
    assert deep_supervision_loss([o, o, o, o], y).item() == pytest.approx(single.item() / 2, rel=1e-9)


def dice_by_hand(p, y, smooth=1e-8):
    """−mean over foreground classes of (2TP + s) / (2TP + FP + FN + s + 1e-8), summed over batch and space."""
    onehot = F.one_hot(y[:, 0], p.shape[1]).permute(0, 4, 1, 2, 3).to(p.dtype)
    dcs = []
    for c in range(1, p.shape[1]):
        tp = (p[:, c] * onehot[:, c]).sum()
        fp = (p[:, c] * (1 - onehot[:, c])).sum()
        fn = ((1 - p[:, c]) * onehot[:, c]).sum()
        dcs.append((2 * tp + smooth) / (2 * tp + fp + fn + smooth + 1e-8))
    return -sum(dcs) / len(dcs)


def test_deep_supervision_loss_by_hand():
    outs = [logits(10 + k) for k in range(4)]
    y = torch.randint(0, 3, (2, 1, 2, 3, 4), generator=torch.Generator().manual_seed(7))
    # (Σ_k CE_k + Σ_k Dice_k) / 8
    expected = sum(F.cross_entropy(o, y[:, 0]) + dice_by_hand(torch.softmax(o, 1), y) for o in outs) / 8
    assert deep_supervision_loss(outs, y).item() == pytest.approx(expected.item(), rel=1e-7)
    assert deep_supervision_loss(outs, y[:, 0]).item() == pytest.approx(expected.item(), rel=1e-7)  # [B, ...] too


def test_gradient_flows_through_the_mean_target():
    outs = [logits(20 + k).requires_grad_() for k in range(4)]
    uncertainty_rectified_loss(outs).backward()
    # the same loss with p̄ detached has a different gradient w.r.t. o_1
    detached = [o.detach().clone().requires_grad_() for o in outs]
    probs = [torch.softmax(o, 1) for o in detached]
    mean = (sum(probs) / 4).detach()
    loss = 0
    for p in probs:
        v = (mean * (mean.log() - p.log())).sum(1, keepdim=True)
        e = torch.exp(-v)
        loss = loss + ((mean - p) ** 2 * e).mean() / (e.mean() + 1e-8) + v.mean()
    (loss / 4).backward()
    assert outs[0].grad.abs().sum() > 0
    assert not torch.allclose(outs[0].grad, detached[0].grad, rtol=1e-3, atol=1e-9)


def test_log_softmax_option_is_finite_where_a_probability_underflows():
    outs = [logits(30 + k) for k in range(4)]
    outs[1] = outs[1].float()
    outs[1][:, 0] = -200.0  # fp32 softmax underflows to exactly 0 for class 0
    outs = [o.float() for o in outs]
    assert not torch.isfinite(uncertainty_rectified_loss(outs))               # the original's log(softmax)
    stable = uncertainty_rectified_loss(outs, log_softmax=True)
    assert torch.isfinite(stable)
    regular = [logits(30 + k).float() for k in range(4)]
    assert uncertainty_rectified_loss(regular, log_softmax=True).item() == pytest.approx(
        uncertainty_rectified_loss(regular).item(), rel=1e-5)


class FixedHeads(torch.nn.Module):
    """Stand-in network returning four given logit tensors."""

    def __init__(self, outs):
        super().__init__()
        self.outs = outs

    def forward(self, x):
        return tuple(self.outs)


def test_training_step_combines_and_ignores_labeled_half_in_consistency():
    cfg = resolve_config(URPC, build_parser(URPC).parse_args(FAST))
    method = URPC(cfg)
    outs = [logits(40 + k, shape=(4, 14, 2, 3, 4)) for k in range(4)]
    y = torch.randint(0, 14, (2, 1, 2, 3, 4), generator=torch.Generator().manual_seed(8))
    x = torch.zeros(2, 1, 2, 3, 4)
    method.nets["model"] = FixedHeads(outs)
    out = method.training_step(x, y, x, engine.Step(0, 0, 0, 0.01, 0.3))
    con = uncertainty_rectified_loss([o[2:] for o in outs])
    sup = deep_supervision_loss([o[:2] for o in outs], y)
    assert out["con"].item() == pytest.approx(con.item()) and out["sup"].item() == pytest.approx(sup.item())
    assert out["loss"].item() == pytest.approx(sup.item() + 0.3 * con.item())
    changed = [torch.cat([o[:2] + 5 * logits(50, shape=(2, 14, 2, 3, 4)), o[2:]]) for o in outs]
    method.nets["model"] = FixedHeads(changed)
    out2 = method.training_step(x, y, x, engine.Step(0, 0, 0, 0.01, 0.3))
    assert out2["con"].item() == out["con"].item() and out2["sup"].item() != out["sup"].item()


def test_width_default_is_the_originals_16_filters():
    argv = ["--task", "synapse", "--device", "cpu"]
    cfg = resolve_config(URPC, build_parser(URPC).parse_args(argv))
    assert cfg.n_filters == 16 and URPC.network == "unet_3D_ds" and URPC.bare_checkpoint
    assert resolve_config(URPC, build_parser(URPC).parse_args(argv + ["--n_filters", "4"])).n_filters == 4


def load_test_cli():
    spec = importlib.util.spec_from_file_location("dhc_test_cli_urpc", os.path.join(REPO_ROOT, "code", "test.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_trained_run_goes_through_test_py(tiny_data):
    """Two tiny epochs, then test.py rebuilds unet_3D_ds from run.json (eval mode: dsv1) and predicts."""
    engine.run(URPC, FAST + ["--exp", "urpc_run", "-ep", "1"])
    write_list(tiny_data / "data" / "splits" / "test.txt", ["0007"])
    cli = load_test_cli()
    assert cli.main(["--task", "phantom", "--exp", "urpc_run", "--device", "cpu", "--cps", "AB"]) == 0
    import SimpleITK as sitk
    pred = sitk.GetArrayFromImage(sitk.ReadImage(str(tiny_data / "logs" / "urpc_run" / "predictions_AB" /
                                                     "0007.nii.gz")))
    net = build_network("unet_3D_ds", 1, 14, 4, has_dropout=False)
    net.load_state_dict(torch.load(tiny_data / "logs" / "urpc_run" / "ckpts" / "best_model.pth"))
    image, _ = prepare_case(get_task("phantom"), "0007")
    expected = sliding_window_predict([net.eval()], image, (16, 32, 32), 32, 16, 14, return_probs=False)[0]
    np.testing.assert_array_equal(pred, expected)
    assert math.prod(pred.shape) > 0


def test_released_checkpoint_without_run_json_gets_the_originals_width(tmp_path, monkeypatch):
    monkeypatch.setenv("DHC_LOG_ROOT", str(tmp_path))
    spec, keys, _ = load_test_cli().read_run_config(get_task("synapse"), "Task_synapse_20p/urpc/fold1")
    assert spec["name"] == "unet_3D_ds" and spec["n_filters"] == 16 and keys is None  # not the VNet's 32
