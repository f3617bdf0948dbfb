"""UNETR++ (code/models/unetrpp.py) and DHC on it (code/train_dhc_unetrpp.py): the original's state dict at the
paper configuration, EPA against a hand-written reference, patch handling, init and defaults. Training, resume
and the three-seed script are covered for dhc_unetrpp by test_methods_common.py and test_end_to_end.py."""
import json
import os

import pytest
import torch

import engine
from conftest import FAST
from models import build_network
from models.unetrpp import EPA
from test_methods_common import EXTRA_FLAGS, make_method
from test_test_script import cli
from train_dhc import DHC
from train_dhc_unetrpp import DHCUnetrPP
from utils.io import ConfigError
from utils.runinfo import build_parser
from utils.task import get_task

# [key, shape] of every entry of the original's UNETR_PP(in_channels=1, out_channels=14, feature_size=32,
# hidden_size=512, dims=[64, 128, 256, 512]) state dict, in order (its released configuration).
KEYS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "unetrpp_keys_c14_f32.json")
SMALL = (32, 32, 64)


def test_state_dict_and_output_equal_the_original_at_paper_size():
    with torch.device("meta"):  # shapes only: no 95 M random draws, no 2 GiB of activations
        net = build_network("UNETR_PP", 1, 14, 32)
        out = net(torch.empty(1, 1, 64, 128, 128))
    with open(KEYS) as f:
        expected = json.load(f)
    assert len(expected) == 485
    assert [[k, list(v.shape)] for k, v in net.state_dict().items()] == expected  # names, shapes and order
    assert sum(p.numel() for p in net.parameters()) == 95_342_966
    assert len(net.state_dict()) - len(list(net.parameters())) == 126  # BatchNorm3d buffers: 42 × 3
    # one transformer block: 59C² + 8C + NC + NP + 8 parameters; stage 3 has C = 512, N = 2·4·4 = 32, P = 32
    block = net.unetr_pp_encoder.stages[3][0]
    assert sum(p.numel() for p in block.parameters()) == 59 * 512 ** 2 + 8 * 512 + 32 * 512 + 32 * 32 + 8
    assert out.shape == (1, 14, 64, 128, 128)  # one logits tensor: no deep supervision


def test_small_patch_sizes_the_tokens_and_keeps_the_output_shape():
    torch.manual_seed(0)
    net = build_network("UNETR_PP", 1, 3, 4, patch_size=SMALL)
    sd = net.state_dict()
    # stage s has prod(patch / (4·2^s)) tokens: 8·8·16 = 1024, 128, 16, 2; widths 2F·2^s = 8, 16, 32, 64
    assert sd["unetr_pp_encoder.stages.0.0.pos_embed"].shape == (1, 1024, 8)
    assert sd["unetr_pp_encoder.stages.3.2.epa_block.EF"].shape == (2, 32)
    assert sd["decoder5.decoder_block.0.2.pos_embed"].shape == (1, 16, 32)
    assert sd["decoder3.decoder_block.0.0.epa_block.EF"].shape == (1024, 64)
    assert len(sd) == 485
    with torch.no_grad():
        assert net.eval()(torch.randn(1, 1, *SMALL)).shape == (1, 3, *SMALL)
    with pytest.raises(ValueError, match=r"patch \(32, 32, 64\) got input \(32, 64, 32\)"):
        net(torch.randn(1, 1, 32, 64, 32))


def epa_reference(epa, u):
    """EPA written out per batch item, head and token, in float64 (docs/methods.md#dhc_unetrpp)."""
    n_batch, n_tok, c = u.shape
    h = epa.num_heads
    dh = c // h
    out = torch.zeros(n_batch, n_tok, c, dtype=torch.float64)
    for b in range(n_batch):
        z = u[b] @ epa.qkvv.weight.T  # [N, 4C]: column s·C + head·dh + d = slot s (q, k, v_CA, v_SA)
        for head in range(h):
            q, k, v_ca, v_sa = (z[:, s * c + head * dh: s * c + (head + 1) * dh].T for s in range(4))  # [dh, N]
            k_ef, v_ef = k @ epa.EF, v_sa @ epa.EF                                  # un-normalised k: [dh, P]
            q_hat = q / q.norm(dim=1, keepdim=True).clamp_min(1e-12)               # over the tokens
            k_hat = k / k.norm(dim=1, keepdim=True).clamp_min(1e-12)
            channel = torch.softmax(q_hat @ k_hat.T * epa.temperature[head], dim=1) @ v_ca   # [dh, N]
            spatial = torch.softmax(q_hat.T @ k_ef * epa.temperature2[head], dim=1) @ v_ef.T  # [N, dh]
            for d in range(dh):
                for n in range(n_tok):
                    out[b, n, head * dh + d] += channel[d, n]
                    # spatial value (head, n, d) sits at d·(h·N) + head·N + n of a [dh, h, N] buffer that is
                    # then read as [N, C] (the original's scrambled reshape)
                    row, col = divmod(d * h * n_tok + head * n_tok + n, c)
                    out[b, row, col] += spatial[n, d]
    return out


def test_epa_matches_the_hand_written_reference():
    torch.manual_seed(0)
    epa = EPA(input_size=6, hidden_size=8, proj_size=3, num_heads=4).double().eval()
    with torch.no_grad():
        epa.temperature.uniform_(0.5, 2.0)
        epa.temperature2.uniform_(0.5, 2.0)
        u = torch.randn(2, 6, 8, dtype=torch.float64)
        assert torch.allclose(epa(u), epa_reference(epa, u), rtol=0, atol=1e-12)


@pytest.mark.parametrize("patch", [(16, 48, 48), (64, 128, 96 + 16)])
def test_unsupported_patch_is_a_one_line_config_error(patch):
    with pytest.raises(ConfigError) as info:
        build_network("UNETR_PP", 1, 14, 4, patch_size=patch)
    message = str(info.value)
    assert f"patch {patch}" in message and "multiple of 32" in message and "\n" not in message
    with pytest.raises(ConfigError, match="n_filters 3: it must be even"):
        build_network("UNETR_PP", 1, 14, 3, patch_size=SMALL)


def test_unsupported_patch_on_the_command_line_is_one_error_line(tiny_data, capsys):
    with pytest.raises(SystemExit) as info:
        engine.run(DHCUnetrPP, FAST + ["--exp", "bad"])  # FAST's patch 16×32×32
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: UNETR_PP cannot take patch (16, 32, 32)") and "\n" not in err


def test_eval_output_is_deterministic_for_the_same_weights():
    torch.manual_seed(0)
    net = build_network("UNETR_PP", 1, 3, 4, patch_size=(32, 32, 32))
    with torch.no_grad():  # make the attention path and the BatchNorm statistics matter
        for name, p in net.named_parameters():
            if name.endswith(("gamma", "pos_embed")):
                p.normal_(0, 1)
        for name, buf in net.named_buffers():
            if name.endswith("running_mean"):
                buf.normal_(0, 0.1)
            elif name.endswith("running_var"):
                buf.uniform_(0.5, 1.5)
    torch.manual_seed(1)
    twin = build_network("UNETR_PP", 1, 3, 4, patch_size=(32, 32, 32))
    twin.load_state_dict(net.state_dict(), strict=True)
    x = torch.randn(1, 1, 32, 32, 32)
    net.eval()
    twin.eval()
    with torch.no_grad():
        y = net(x)
        torch.manual_seed(2)  # eval mode draws nothing (dropout off): the RNG state does not matter
        assert torch.equal(y, net(x)) and torch.equal(y, twin(x))
        net.unetr_pp_encoder.stages[0][0].gamma.zero_()  # and the attention path counts
        assert not torch.allclose(y, net(x))


def test_dhc_init_is_kaiming_on_conv3d_only():
    torch.manual_seed(0)
    reference = build_network("UNETR_PP", 1, 14, 4, patch_size=(32, 32, 32))  # A's default draws (same seed)
    method = make_method(DHCUnetrPP, EXTRA_FLAGS["dhc_unetrpp"])  # seeds 0, builds A then B, then inits both
    for net in method.nets.values():
        block = net.unetr_pp_encoder.stages[3][0]  # C = 4F·4 = 64
        assert block.conv51.conv1.conv.weight.std().item() == pytest.approx((2 / (64 * 27)) ** 0.5, rel=0.05)
        assert block.conv8[1].weight.std().item() == pytest.approx((2 / 64) ** 0.5, rel=0.05)   # kaiming fan_in
        assert block.epa_block.qkvv.weight.std().item() == pytest.approx(0.02, rel=0.05)        # trunc_normal
        assert torch.all(block.gamma == 1e-6) and torch.all(block.pos_embed == 0)
        qkvv = net.decoder5.decoder_block[0][0].epa_block.qkvv.weight  # decoders: PyTorch default U(±1/√C)
        assert qkvv.abs().max().item() <= 32 ** -0.5 and qkvv.std().item() == pytest.approx((3 * 32) ** -0.5, rel=0.1)
    a, ref = method.nets["A"].state_dict(), reference.state_dict()
    untouched = [k for k in ref if "transp_conv" in k or k.endswith(("EF", "qkvv.weight", "bias"))]
    assert len(untouched) > 40 and all(torch.equal(a[k], ref[k]) for k in untouched)
    assert not torch.equal(a["out1.conv.conv.weight"], ref["out1.conv.conv.weight"])


def test_no_flips_by_default_and_dhc_otherwise_unchanged():
    def parse(cls, *argv):
        return build_parser(cls).parse_args(list(argv))
    assert parse(DHCUnetrPP).no_flip is True and parse(DHCUnetrPP, "--flip").no_flip is False
    assert parse(DHC).no_flip is False
    ours, dhc = parse(DHCUnetrPP), parse(DHC)
    assert (ours.base_lr, ours.cps_w, ours.cps_rampup) == (dhc.base_lr, dhc.cps_w, dhc.cps_rampup) == (3e-2, 0.1, True)
    assert DHCUnetrPP.training_step is DHC.training_step and DHCUnetrPP.network == "UNETR_PP"


def test_test_script_rebuilds_unetrpp_with_the_runs_patch(tmp_path, monkeypatch):
    """run.json's network and patch (not the task's 16×48×48, which UNETR_PP cannot take) rebuild the net."""
    monkeypatch.setenv("DHC_LOG_ROOT", str(tmp_path))
    torch.manual_seed(0)
    net = build_network("UNETR_PP", 1, 14, 4, patch_size=(32, 32, 32))
    (tmp_path / "exp").mkdir()
    (tmp_path / "exp" / "run.json").write_text(json.dumps({
        "task": "phantom", "network": {"name": "UNETR_PP", "n_channels": 1, "n_classes": 14, "n_filters": 4,
                                       "normalization": "batchnorm"},
        "checkpoint_keys": ["A", "B"], "patch_size": [32, 32, 32]}))
    spec, keys, patch = cli.read_run_config(get_task("phantom"), "exp")
    assert spec["name"] == "UNETR_PP" and keys == ["A", "B"] and patch == (32, 32, 32)
    loaded = cli.load_net(dict(spec, patch_size=patch), net.state_dict(), "best_model.pth['A']", "cpu")
    assert loaded.patch_size == (32, 32, 32) and not loaded.training
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), net.state_dict().values()))
    with pytest.raises(ConfigError, match=r"patch \(16, 48, 48\)"):
        cli.load_net(dict(spec, patch_size=(16, 48, 48)), net.state_dict(), "x", "cpu")
