"""DST: confident pseudo-labels (strict 0.95), the masked cross-entropy's normalisation, the worst-case loss by
hand, the gradient routing (decoder_pseudo untouched by default, GRL scaling of the encoder gradient), the GRL
counters in the method state, and test.py on a trained run."""
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
from train_dst import DST, WarmStartGradientReverseLayer, WorstCaseEstimationLoss, confident_labels
from utils.inference import prepare_case, sliding_window_predict
from utils.io import ConfigError, write_list
from utils.loss import WeightedCrossEntropyLoss
from utils.runinfo import build_parser, resolve_config
from utils.task import REPO_ROOT, get_task


def rand(seed, shape, scale=2.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale


def test_confidence_threshold_is_strict_above_095():
    # two classes, logit gap g: max softmax = 1 / (1 + e^-g); g = log(19) gives exactly 0.95 in exact arithmetic
    gaps = torch.tensor([math.log(19) - 1e-3, math.log(19) + 1e-3, 5.0, 0.0], dtype=torch.float64)
    logits = torch.stack([gaps, torch.zeros(4, dtype=torch.float64)], 0).reshape(1, 2, 1, 1, 4)
    labels, mask = confident_labels(logits)
    assert mask.flatten().tolist() == [0.0, 1.0, 1.0, 0.0] and labels.flatten().tolist() == [0, 0, 0, 0]
    conf = torch.softmax(logits, 1).max(1).values.flatten()
    assert conf[0] < 0.95 < conf[1]


def test_masked_cross_entropy_normalisation():
    z, t = rand(1, (2, 3, 2, 3, 4)), torch.randint(0, 3, (2, 2, 3, 4), generator=torch.Generator().manual_seed(2))
    masked_ce = WeightedCrossEntropyLoss()
    mask = (torch.rand(2, 2, 3, 4, generator=torch.Generator().manual_seed(3)) > 0.5).double()
    per_voxel = F.cross_entropy(z, t, reduction="none")
    # Σ m·CE / (B·D·H·W), not / Σ m
    assert masked_ce(z, t, mask).item() == pytest.approx((mask * per_voxel).sum().item() / (2 * 2 * 3 * 4))
    assert masked_ce(z, t, torch.zeros_like(mask)).item() == 0.0
    assert masked_ce(z, t, torch.ones_like(mask)).item() == pytest.approx(F.cross_entropy(z, t).item())


def test_worst_case_loss_by_hand():
    y_l, y_l_adv, y_u, y_u_adv = (rand(10 + k, (2, 3, 2, 2, 3)) for k in range(4))
    got = WorstCaseEstimationLoss()(y_l, y_l_adv, y_u, y_u_adv).item()
    a_l, a_u = y_l_adv.numpy(), y_u_adv.numpy()
    t_l, t_u = y_l.numpy().argmax(1), y_u.numpy().argmax(1)
    p_l = np.exp(a_l) / np.exp(a_l).sum(1, keepdims=True)
    p_u = np.exp(a_u) / np.exp(a_u).sum(1, keepdims=True)
    pick = lambda p, t: np.take_along_axis(p, t[:, None], 1)[:, 0]  # noqa: E731
    # 2·CE(w_l, argmax z_l) + mean(−log(min(1, 1 − p_u[argmax z_u] + 1e-6)))
    expected = 2 * np.mean(-np.log(pick(p_l, t_l))) + np.mean(-np.log(np.minimum(1, 1 - pick(p_u, t_u) + 1e-6)))
    assert got == pytest.approx(expected, rel=1e-9)


def test_worst_case_unlabeled_term_vanishes_when_the_worst_head_rejects_the_prediction():
    y_u = torch.zeros(1, 3, 1, 1, 2, dtype=torch.float64)
    y_u[:, 1] = 5.0                                   # main head predicts class 1 everywhere
    y_u_adv = torch.zeros_like(y_u)
    y_u_adv[:, 1] = -60.0                             # worst head: p(class 1) ≈ 1e-26 -> -log(min(1, 1 + 1e-6)) = 0
    y_l = y_l_adv = torch.zeros(1, 3, 1, 1, 2, dtype=torch.float64)
    loss = WorstCaseEstimationLoss()(y_l, y_l_adv, y_u, y_u_adv)
    assert loss.item() == pytest.approx(2 * math.log(3), abs=1e-12)  # only 2·CE of uniform logits remains


def make_method(*extra):
    torch.manual_seed(0)
    cfg = resolve_config(DST, build_parser(DST).parse_args(FAST + ["--patch_size", "16", "16", "16", *extra]))
    return DST(cfg)


def batch():
    g = torch.Generator().manual_seed(1)
    return (torch.rand(2, 1, 16, 16, 16, generator=g), torch.randint(0, 14, (2, 1, 16, 16, 16), generator=g),
            torch.rand(2, 1, 16, 16, 16, generator=g))


def grads(net, prefix):
    return {k: p.grad for k, p in net.named_parameters() if k.startswith(prefix)}


def test_faithful_routing_pseudo_decoder_gets_no_gradient():
    method = make_method()
    assert method.nets["A"].decoder.head.weight.std() > 0 and DST.init_a == "kaiming" and DST.init_b == "xavier"
    out = method.training_step(*batch(), engine.Step(0, 0, 0, 0.01, 0.5))
    out["loss"].backward()
    for net in method.nets.values():
        assert all(g is None for g in grads(net, "decoder_pseudo.").values())
        assert all(g is not None for g in grads(net, "decoder.").values())
        assert all(g is not None for g in grads(net, "decoder_worst.").values())
        assert net.block_one.conv[0].weight.grad is not None
    assert out["loss"].item() == pytest.approx((out["sup"] + 0.5 * (out["cps"] + out["worst"])).item(), rel=1e-6)


def test_train_pseudo_head_option_routes_pseudo_labels_to_the_pseudo_decoder():
    method = make_method("--train_pseudo_head")
    x_l, y_l, x_u = batch()
    torch.manual_seed(5)
    method.training_step(x_l, y_l, x_u, engine.Step(0, 0, 0, 0.01, 0.5))["loss"].backward()
    main = {k: g.clone() for k, g in grads(method.nets["A"], "decoder.").items()}
    assert all(g is not None for g in grads(method.nets["A"], "decoder_pseudo.").values())
    # the main decoder now learns from the labels only: its gradient is that of L_sup alone
    for net in method.nets.values():
        net.zero_grad(set_to_none=True)
    torch.manual_seed(5)
    (z_a, _, _), (z_b, _, _), n_l = method.forward_both(x_l, x_u)
    (method.sup_losses["A"](z_a[:n_l], y_l) + method.sup_losses["B"](z_b[:n_l], y_l)).backward()
    for k, g in grads(method.nets["A"], "decoder.").items():
        torch.testing.assert_close(main[k], g, rtol=1e-5, atol=1e-8)


def test_encoder_gradient_of_the_worst_loss_is_reversed_and_scaled():
    torch.manual_seed(0)
    net = build_network("VNet_Decoupled", 1, 3, 4, has_dropout=False).double().train()  # float64: exact sums
    net.decoder_worst.grl_layer.iter_num = 500            # coeff 0.2 / (1 + e^-1) - 0.1 = 0.0462117
    x = torch.rand(4, 1, 16, 16, 16, generator=torch.Generator().manual_seed(3), dtype=torch.float64)

    def encoder_grad():
        net.zero_grad(set_to_none=True)
        z, _, w = net(x)
        WorstCaseEstimationLoss()(z[:2], w[:2], z[2:], w[2:]).backward()
        return [p.grad.clone() for k, p in net.named_parameters() if k.startswith("block_")]

    reversed_ = encoder_grad()
    net.decoder_worst.grl_layer.forward = lambda f: f    # the GRL replaced by the identity
    plain = encoder_grad()
    coeff = 0.2 / (1 + math.exp(-1)) - 0.1
    for r, p in zip(reversed_, plain):
        torch.testing.assert_close(r, -coeff * p, rtol=1e-9, atol=1e-15)


def test_grl_counters_advance_after_each_step_and_round_trip_through_state():
    method = make_method()
    for _ in range(3):
        method.after_optimizer_step(None)
    state = method.state_dict()
    assert state["grl_iter"] == {"A": 3, "B": 3}
    assert method.on_epoch_end(0)["grl_coeff"] == pytest.approx(0.2 / (1 + math.exp(-3 / 500)) - 0.1)
    fresh = make_method()
    fresh.load_state_dict(state)
    assert fresh.nets["B"].decoder_worst.grl_layer.iter_num == 3 and fresh.nets["A"].decoder.grl_layer.iter_num == 0
    assert WarmStartGradientReverseLayer is type(fresh.nets["A"].decoder_worst.grl_layer)


def test_only_the_wce_cross_loss_exists():
    with pytest.raises(ConfigError, match="cps_loss"):
        make_method("--cps_loss", "ce")


def test_defaults_ramp_up_on():
    cfg = resolve_config(DST, build_parser(DST).parse_args(FAST))
    assert cfg.cps_rampup and DST.network == "VNet_Decoupled" and not DST.bare_checkpoint


def test_trained_run_goes_through_test_py(tiny_data):
    """Two tiny epochs, then test.py rebuilds both VNet_Decoupled nets from run.json (eval: main head)."""
    engine.run(DST, FAST + ["--exp", "dst_run", "-ep", "1", "--patch_size", "16", "16", "16"])
    write_list(tiny_data / "data" / "splits" / "test.txt", ["0007"])
    spec = importlib.util.spec_from_file_location("dhc_test_cli_dst", os.path.join(REPO_ROOT, "code", "test.py"))
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    assert cli.main(["--task", "phantom", "--exp", "dst_run", "--device", "cpu", "--cps", "AB"]) == 0
    import SimpleITK as sitk
    folder = tiny_data / "logs" / "dst_run"
    pred = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "predictions_AB" / "0007.nii.gz")))
    ckpt = torch.load(folder / "ckpts" / "best_model.pth")
    nets = []
    for key in ("A", "B"):
        net = build_network("VNet_Decoupled", 1, 14, 4, has_dropout=False)
        net.load_state_dict(ckpt[key])
        nets.append(net.eval())
    image, _ = prepare_case(get_task("phantom"), "0007")
    expected = sliding_window_predict(nets, image, (16, 16, 16), 16, 16, 14, return_probs=False)[0]
    np.testing.assert_array_equal(pred, expected)
