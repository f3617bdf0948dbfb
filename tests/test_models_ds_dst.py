"""unet_3D_ds (URPC) and VNet_Decoupled (DST): the original's keys, shapes and parameter counts at the paper
configuration, outputs per mode, dropout switched off by eval(), and the warm-start gradient-reversal layer."""
import math

import pytest
import torch
import torch.nn as nn

from models import build_network
from models.vnet_dst import WarmStartGradientReverseLayer

X = torch.rand(2, 1, 16, 16, 32, generator=torch.Generator().manual_seed(0))  # sizes divisible by 16


def on_meta(name, n_classes, n_filters):
    """Construction only (no memory, no init cost): enough for keys, shapes and counts at paper size."""
    with torch.device("meta"):
        return build_network(name, 1, n_classes, n_filters, has_dropout=True)


def n_params(net):
    return sum(p.numel() for p in net.parameters())


# ------------------------------------------------------------------------------------------------ unet_3D_ds

@pytest.mark.parametrize("n_classes, params", [(14, 5_887_432), (16, 5_887_920)])
def test_unet_ds_paper_size_keys_and_params(n_classes, params):
    net = on_meta("unet_3D_ds", n_classes, 16)
    sd = net.state_dict()
    assert len(sd) == 44 and n_params(net) == params
    assert all(k.endswith((".weight", ".bias")) for k in sd)       # InstanceNorm without affine: no norm keys
    assert not list(net.buffers())
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    assert shapes["conv1.conv1.0.weight"] == (16, 1, 3, 3, 3)       # filters 16, 32, 64, 128, 256
    assert shapes["center.conv2.0.weight"] == (256, 256, 3, 3, 3)
    assert shapes["up_concat4.conv.conv1.0.weight"] == (128, 384, 3, 3, 3)  # skip 128 + upsampled 256
    assert shapes["up_concat1.conv.conv1.0.weight"] == (16, 48, 3, 3, 3)
    assert shapes["dsv4.dsv.0.weight"] == (n_classes, 128, 1, 1, 1)
    assert shapes["dsv1.weight"] == (n_classes, 16, 1, 1, 1)
    assert list(sd)[:2] == ["conv1.conv1.0.weight", "conv1.conv1.0.bias"] and list(sd)[-1] == "dsv1.bias"


def test_unet_ds_width_scales_with_n_filters():
    net = on_meta("unet_3D_ds", 3, 4)  # first filter count 4: 4, 8, 16, 32, 64
    assert net.center.conv2[0].weight.shape == (64, 64, 3, 3, 3) and len(net.state_dict()) == 44


def test_unet_ds_outputs_per_mode_and_eval_turns_dropout_off():
    torch.manual_seed(0)
    net = build_network("unet_3D_ds", 1, 3, 4, has_dropout=True).train()
    outs = net(X)
    assert isinstance(outs, tuple) and len(outs) == 4
    assert all(o.shape == (2, 3, 16, 16, 32) for o in outs)          # every head upsampled to full size
    torch.manual_seed(1)
    assert not torch.equal(net(X)[0], outs[0])                       # train mode: dropout draws differ
    plain = build_network("unet_3D_ds", 1, 3, 4, has_dropout=False)
    plain.load_state_dict(net.state_dict())
    net.eval()
    out = net(X)
    assert torch.is_tensor(out) and out.shape == (2, 3, 16, 16, 32)
    # InstanceNorm has no running statistics, so eval output == train-mode dsv1 of the dropout-free net
    torch.testing.assert_close(out, plain.train()(X)[0], rtol=0, atol=1e-6)


def test_unet_ds_kaiming_fan_in_init():
    torch.manual_seed(0)
    net = build_network("unet_3D_ds", 1, 14, 16)
    w = net.up_concat4.conv.conv1[0].weight                          # fan_in = 384 * 27
    assert w.std().item() == pytest.approx(math.sqrt(2 / (384 * 27)), rel=0.02)
    w = net.center.conv2[0].weight                                   # fan_in = 256 * 27
    assert w.std().item() == pytest.approx(math.sqrt(2 / (256 * 27)), rel=0.02)


def unet_ds_reference_init(n_channels, n_classes, n_filters):
    """The original unet_3D_ds's draws, written out by hand from its constructors: each Conv3d draws PyTorch's
    default init when built (weight kaiming-uniform a = √5, bias U(±1/√fan_in)); every UnetConv3 ends by redrawing
    its two weights kaiming-normal (fan_in); the net's constructor ends by redrawing every Conv3d weight once more,
    in registration order. Returns {state-dict key: tensor}."""
    f = [n_filters * 2 ** k for k in range(5)]

    def conv(key, cin, cout, k):
        w, b = torch.empty(cout, cin, k, k, k), torch.empty(cout)
        nn.init.kaiming_uniform_(w, a=math.sqrt(5))
        nn.init.uniform_(b, -1 / math.sqrt(cin * k ** 3), 1 / math.sqrt(cin * k ** 3))
        params[key + ".weight"], params[key + ".bias"] = w, b

    def unet_conv3(name, cin, cout):
        conv(f"{name}.conv1.0", cin, cout, 3)
        conv(f"{name}.conv2.0", cout, cout, 3)
        for i in (1, 2):  # the first redraw, inside UnetConv3
            nn.init.kaiming_normal_(params[f"{name}.conv{i}.0.weight"], a=0, mode="fan_in")

    params = {}
    for name, cin, cout in (("conv1", n_channels, f[0]), ("conv2", f[0], f[1]), ("conv3", f[1], f[2]),
                            ("conv4", f[2], f[3]), ("center", f[3], f[4])):
        unet_conv3(name, cin, cout)
    for k in (4, 3, 2, 1):
        unet_conv3(f"up_concat{k}.conv", f[k] + f[k - 1], f[k - 1])
    for k in (4, 3, 2):
        conv(f"dsv{k}.dsv.0", f[k - 1], n_classes, 1)
    conv("dsv1", f[0], n_classes, 1)
    for key in params:  # the second redraw, over every Conv3d in registration order (= insertion order here)
        if key.endswith(".weight"):
            nn.init.kaiming_normal_(params[key], a=0, mode="fan_in")
    return params


def test_unet_ds_init_follows_the_originals_draw_order():
    """Same seed -> the original's weights, and the CPU random stream left where the original leaves it (two
    kaiming redraws; one alone, as before, gives other weights and leaves the stream 18 weight tensors behind)."""
    torch.manual_seed(3)
    net = build_network("unet_3D_ds", 1, 5, 4)
    after_net = torch.rand(4)
    torch.manual_seed(3)
    reference = unet_ds_reference_init(1, 5, 4)
    after_reference = torch.rand(4)
    sd = net.state_dict()
    assert list(sd) == list(reference)
    for key, value in reference.items():
        assert torch.equal(sd[key], value), key
    assert torch.equal(after_net, after_reference)


def test_unet_ds_normalization_options():
    with torch.device("meta"):
        plain = build_network("unet_3D_ds", 1, 3, 4, normalization="none")
        inorm = build_network("unet_3D_ds", 1, 3, 4, normalization="instancenorm")
    assert not any(isinstance(m, nn.InstanceNorm3d) for m in plain.modules())
    assert sum(isinstance(m, nn.InstanceNorm3d) for m in inorm.modules()) == 18  # 9 UnetConv3 × 2
    assert list(plain.state_dict()) == list(inorm.state_dict())                   # same 44 keys
    with pytest.raises(ValueError, match="normalization"):
        build_network("unet_3D_ds", 1, 3, 4, normalization="groupnorm")


# ------------------------------------------------------------------------------------------------ VNet_Decoupled

def test_vnet_decoupled_paper_size_keys_and_params():
    net = on_meta("VNet_Decoupled", 14, 32)
    sd = net.state_dict()
    assert len(sd) == 391 and n_params(net) == 54_343_786
    assert sum(k.startswith("block_") for k in sd) == 112
    for prefix in ("decoder.", "decoder_pseudo.", "decoder_worst."):
        assert sum(k.startswith(prefix) for k in sd) == 93
    assert tuple(sd["block_two.conv.3.weight"].shape) == (64, 64, 3, 3, 3)
    assert tuple(sd["decoder_worst.block_eight_up.conv.0.weight"].shape) == (64, 32, 2, 2, 2)
    assert tuple(sd["decoder.head.weight"].shape) == (14, 32, 1, 1, 1)


def test_vnet_decoupled_main_branch_is_a_vnet():
    # drop the pseudo / worst decoders, decoder.X -> X, head -> out_conv: exactly VNet's 205 keys and shapes
    dst, vnet = on_meta("VNet_Decoupled", 3, 16).state_dict(), on_meta("VNet", 3, 16).state_dict()
    mapped = {k.replace("decoder.", "").replace("head.", "out_conv."): tuple(v.shape) for k, v in dst.items()
              if not k.startswith(("decoder_pseudo.", "decoder_worst."))}
    assert mapped == {k: tuple(v.shape) for k, v in vnet.items()} and len(mapped) == 205


def test_vnet_decoupled_outputs_per_mode():
    torch.manual_seed(0)
    net = build_network("VNet_Decoupled", 1, 3, 4, has_dropout=False)
    x = torch.rand(4, 1, 16, 16, 16, generator=torch.Generator().manual_seed(2))
    main, pseudo, worst = net.train()(x)
    assert main.shape == pseudo.shape == worst.shape == (4, 3, 16, 16, 16)
    assert not torch.allclose(main, pseudo)                          # three decoders of their own
    net.eval()
    out = net(x)
    assert torch.is_tensor(out) and out.shape == (4, 3, 16, 16, 16)
    torch.testing.assert_close(out, net.decoder(net.encode(x)), rtol=0, atol=0)  # eval = main decoder


def test_vnet_decoupled_eval_turns_dropout_off():
    torch.manual_seed(0)
    net = build_network("VNet_Decoupled", 1, 3, 4, has_dropout=True)
    plain = build_network("VNet_Decoupled", 1, 3, 4, has_dropout=False)
    plain.load_state_dict(net.state_dict())
    torch.testing.assert_close(net.eval()(X), plain.eval()(X), rtol=0, atol=0)
    net.train()
    torch.manual_seed(1)
    a = net(X)[0]
    torch.manual_seed(2)
    assert not torch.equal(a, net(X)[0])                             # train mode: dropout active


# ------------------------------------------------------------------------------------------------ GRL

@pytest.mark.parametrize("iters, coeff", [
    (0, 0.0),                  # 0.2 / (1 + e^0) - 0.1 = 0
    (500, 0.0462117157),       # 0.2 / (1 + e^-1) - 0.1
    (1000, 0.0761594156),      # 0.2 / (1 + e^-2) - 0.1 (= 0.1 tanh(1))
    (2000, 0.0964027580),      # 0.2 / (1 + e^-4) - 0.1
    (10 ** 6, 0.1),            # -> hi
])
def test_grl_identity_forward_and_reversed_scaled_gradient(iters, coeff):
    grl = WarmStartGradientReverseLayer(alpha=1.0, lo=0.0, hi=0.1, max_iters=500)
    grl.iter_num = iters
    assert grl.coeff() == pytest.approx(coeff, abs=1e-9)
    x = torch.randn(2, 3, 4, requires_grad=True)
    upstream = torch.randn(2, 3, 4)
    y = grl(x)
    assert torch.equal(y, x)
    y.backward(upstream)
    torch.testing.assert_close(x.grad, -coeff * upstream)


def test_grl_step_and_auto_step():
    grl = WarmStartGradientReverseLayer(alpha=2.0, lo=0.1, hi=0.5, max_iters=10)
    grl.step()
    grl.step()
    # 2(hi - lo) / (1 + exp(-α i / N)) - (hi - lo) + lo with α 2, i 2, N 10
    assert grl.iter_num == 2 and grl.coeff() == pytest.approx(0.8 / (1 + math.exp(-0.4)) - 0.4 + 0.1)
    auto = WarmStartGradientReverseLayer(auto_step=True)
    auto(torch.zeros(1))
    auto(torch.zeros(1))
    assert auto.iter_num == 2


def test_net_step_advances_only_the_worst_decoder():
    with torch.device("meta"):
        net = build_network("VNet_Decoupled", 1, 3, 4)
    net.step()
    net.step()
    assert net.decoder_worst.grl_layer.iter_num == 2
    assert net.decoder.grl_layer.iter_num == net.decoder_pseudo.grl_layer.iter_num == 0
    assert not any("grl" in k or "iter" in k for k in net.state_dict())  # not a checkpoint entry
