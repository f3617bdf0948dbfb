"""VNet layout (docs/pipeline.md#vnet), init helpers (docs/pipeline.md#initialisation,
Q38 in docs/original-quirks.md) and the network registry."""
import math

import pytest
import torch
import torch.nn as nn

from models import NETWORKS, build_network
from models.vnet import VNet
from utils.init import kaiming_normal_init_weight, xavier_normal_init_weight
from utils.io import ConfigError

# (module, ConvBlock depth or "dw"/"up", weight shape of conv.0 for F=32), as in docs/pipeline.md#vnet.
SPEC_F32 = [
    ("block_one", 1, (32, 1, 3, 3, 3)), ("block_one_dw", "dw", (64, 32, 2, 2, 2)),
    ("block_two", 2, (64, 64, 3, 3, 3)), ("block_two_dw", "dw", (128, 64, 2, 2, 2)),
    ("block_three", 3, (128, 128, 3, 3, 3)), ("block_three_dw", "dw", (256, 128, 2, 2, 2)),
    ("block_four", 3, (256, 256, 3, 3, 3)), ("block_four_dw", "dw", (512, 256, 2, 2, 2)),
    ("block_five", 3, (512, 512, 3, 3, 3)), ("block_five_up", "up", (512, 256, 2, 2, 2)),
    ("block_six", 3, (256, 256, 3, 3, 3)), ("block_six_up", "up", (256, 128, 2, 2, 2)),
    ("block_seven", 3, (128, 128, 3, 3, 3)), ("block_seven_up", "up", (128, 64, 2, 2, 2)),
    ("block_eight", 2, (64, 64, 3, 3, 3)), ("block_eight_up", "up", (64, 32, 2, 2, 2)),
    ("block_nine", 1, (32, 32, 3, 3, 3)),
]
BN_KEYS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def expected_state_shapes(n_classes):
    """Key -> shape of the original's F=32 batchnorm VNet, built from the spec table (original order)."""
    shapes = {}
    for module, kind, w0 in SPEC_F32:
        n_stages = 1 if kind in ("dw", "up") else kind
        out_ch = w0[1] if kind == "up" else w0[0]
        for s in range(n_stages):
            w = w0 if s == 0 else (out_ch, out_ch, 3, 3, 3)
            shapes[f"{module}.conv.{3 * s}.weight"] = w
            shapes[f"{module}.conv.{3 * s}.bias"] = (out_ch,)
            for k in BN_KEYS:
                shapes[f"{module}.conv.{3 * s + 1}.{k}"] = () if k == "num_batches_tracked" else (out_ch,)
    shapes["out_conv.weight"] = (n_classes, 32, 1, 1, 1)
    shapes["out_conv.bias"] = (n_classes,)
    return shapes


@pytest.mark.parametrize("n_classes, n_params", [(14, 37_778_126), (16, 37_778_192)])
def test_full_size_keys_shapes_and_parameter_count(n_classes, n_params):
    with torch.device("meta"):  # layout only: no 150 MB allocation
        net = VNet(1, n_classes, 32, "batchnorm", has_dropout=True)
    sd = net.state_dict()
    expected = expected_state_shapes(n_classes)
    assert len(sd) == 205
    assert list(sd) == list(expected)  # same names, same order as the original
    assert {k: tuple(v.shape) for k, v in sd.items()} == expected
    assert sum(p.numel() for p in net.parameters()) == n_params
    encoder = [m for m, _, _ in SPEC_F32[:9]]  # block_one ... block_five
    assert sum(p.numel() for k, p in net.named_parameters() if k.split(".")[0] in encoder) == 29_495_296


def test_released_checkpoint_layout_loads_strict():
    """A state dict written from the spec table (as the authors' best_model.pth['A']) loads with strict=True."""
    net = VNet(1, 14, 32, has_dropout=False)
    ckpt = {k: torch.full(s, 0.25) if s else torch.tensor(7) for k, s in expected_state_shapes(14).items()}
    net.load_state_dict(ckpt, strict=True)
    assert net.block_five_up.conv[0].weight.unique().tolist() == [0.25]
    assert net.block_three.conv[7].num_batches_tracked.item() == 7


def test_small_keys_and_output_shape():
    torch.manual_seed(0)
    net = VNet(1, 14, 4, has_dropout=True)
    sd = net.state_dict()
    assert len(sd) == 205
    assert sd["block_one.conv.0.weight"].shape == (4, 1, 3, 3, 3)
    assert sd["block_five_up.conv.0.weight"].shape == (64, 32, 2, 2, 2)
    assert sd["block_five.conv.7.running_var"].shape == (64,)
    assert sd["out_conv.weight"].shape == (14, 4, 1, 1, 1)
    assert isinstance(net.dropout, nn.Dropout3d) and net.dropout.p == 0.5
    assert net(torch.randn(2, 1, 16, 32, 32)).shape == (2, 14, 16, 32, 32)


def test_forward_matches_hand_composition():
    """Additive skips: recompute the forward block by block (docs/pipeline.md#vnet, 'Forward')."""
    torch.manual_seed(1)
    net = VNet(1, 3, 4).eval()
    x = torch.randn(1, 1, 16, 32, 32)
    with torch.no_grad():
        x1 = net.block_one(x)
        x2 = net.block_two(net.block_one_dw(x1))
        x3 = net.block_three(net.block_two_dw(x2))
        x4 = net.block_four(net.block_three_dw(x3))
        x5 = net.block_five(net.block_four_dw(x4))
        x6 = net.block_six(net.block_five_up(x5) + x4)
        x7 = net.block_seven(net.block_six_up(x6) + x3)
        x8 = net.block_eight(net.block_seven_up(x7) + x2)
        x9 = net.block_nine(net.block_eight_up(x8) + x1)
        assert x5.shape == (1, 64, 1, 2, 2)
        torch.testing.assert_close(net(x), net.out_conv(x9), rtol=0, atol=0)


def test_dropout_train_eval_and_turnoff():
    torch.manual_seed(2)
    net = VNet(1, 3, 4, has_dropout=True)
    plain = VNet(1, 3, 4, has_dropout=False)
    plain.load_state_dict(net.state_dict())
    x = torch.randn(2, 1, 16, 32, 32)
    with torch.no_grad():
        net.eval()
        assert torch.equal(net(x), net(x))
        net.train()
        assert not torch.equal(net(x), net(x))  # Dropout3d(0.5) active at x5 and x9
        off1, off2 = net(x, turnoff_drop=True), net(x, turnoff_drop=True)
        assert torch.equal(off1, off2)
        torch.testing.assert_close(off1, plain.train()(x))
        assert net.has_dropout  # turnoff_drop is only for that call
        assert not torch.equal(net(x), off1)


@pytest.mark.parametrize("norm, conv_idx, n_keys", [("none", (0, 2, 4), 60), ("instancenorm", (0, 3, 6), 60),
                                                     ("groupnorm", (0, 3, 6), 118)])
def test_other_normalizations(norm, conv_idx, n_keys):
    """'none' has no norm layer, so the original's Sequential indices shift (conv at 2s); InstanceNorm has no keys."""
    net = VNet(1, 3, 16, norm)
    sd = net.state_dict()
    assert len(sd) == n_keys
    assert [k for k in sd if k.startswith("block_three.") and sd[k].dim() == 5] == \
        [f"block_three.conv.{i}.weight" for i in conv_idx]
    if norm == "groupnorm":
        assert net.block_three.conv[1].num_groups == 16 and sd["block_three.conv.1.weight"].shape == (64,)
    assert net(torch.randn(1, 1, 16, 32, 32)).shape == (1, 3, 16, 32, 32)
    with pytest.raises(ValueError, match="normalization"):
        VNet(1, 3, 4, "layernorm")


@pytest.mark.parametrize("init, std_of", [
    (kaiming_normal_init_weight, lambda fan_in, fan_out: math.sqrt(2 / fan_in)),
    (xavier_normal_init_weight, lambda fan_in, fan_out: math.sqrt(2 / (fan_in + fan_out)))])
def test_init_helpers(init, std_of):
    torch.manual_seed(3)
    net = VNet(1, 3, 8)
    for m in net.modules():  # make BN 1/0 a real check
        if isinstance(m, nn.BatchNorm3d):
            nn.init.uniform_(m.weight, 2, 3)
            nn.init.uniform_(m.bias, 2, 3)
    deconv = {k: v.clone() for k, v in net.state_dict().items() if "_up.conv.0" in k}
    biases = {k: m.bias.clone() for k, m in net.named_modules() if isinstance(m, nn.Conv3d)}
    assert init(net) is net
    sd = net.state_dict()
    assert all(torch.equal(sd[k], v) for k, v in deconv.items())  # ConvTranspose3d untouched (Q38)
    assert all(torch.equal(m.bias, biases[k]) for k, m in net.named_modules() if isinstance(m, nn.Conv3d))
    checked = 0
    for m in net.modules():
        if isinstance(m, nn.BatchNorm3d):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0)
        elif isinstance(m, nn.Conv3d) and m.weight.numel() >= 30_000:
            k = m.weight[0, 0].numel()
            want = std_of(m.in_channels * k, m.out_channels * k)
            assert abs(m.weight.std().item() / want - 1) < 0.03, (m, m.weight.std().item(), want)
            assert abs(m.weight.mean().item()) < 0.05 * want
            checked += 1
    assert checked == 10  # F=8: block_four ×3, block_four_dw (fan_in 512, fan_out 1024), block_five ×3, block_six ×3


def test_build_network():
    assert NETWORKS["VNet"] is VNet
    net = build_network("VNet", 1, 5, 4, has_dropout=True)
    assert isinstance(net, VNet) and net.has_dropout and net.out_conv.out_channels == 5
    assert isinstance(net.block_one.conv[1], nn.BatchNorm3d) and net.block_one.conv[0].out_channels == 4
    with pytest.raises(ConfigError, match="known networks: VNet"):
        build_network("UNet", 1, 5, 4)
