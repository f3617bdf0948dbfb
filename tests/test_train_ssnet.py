"""SS-Net (docs/methods.md#ssnet): the VNet4SSNet layout and modes, the class-wise memory bank, the contrastive
loss by hand, VAT against a finite-difference reference, BN statistics around VAT, the training step, and
test.py on a VNet4SSNet run."""
import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import engine
import train_ssnet as ss
from models import build_network
from models.vnet import VNet
from test_methods_common import make_method, tiny_batch
from test_test_script import PATCH, cli, env, expected_labels, make_exp, read_pred  # noqa: F401 (env: fixture)

HEAD_KEYS = ["0.weight", "0.bias", "1.weight", "1.bias", "1.running_mean", "1.running_var", "1.num_batches_tracked",
             "3.weight", "3.bias"]


def tiny_net(n_classes=3, seed=0):
    torch.manual_seed(seed)
    return build_network("VNet4SSNet", 1, n_classes, 4, has_dropout=True)  # F = 4: features of width 8


# ------------------------------------------------------------------------------------------------- network

@pytest.mark.parametrize("n_classes, n_params", [(14, 37_914_858), (16, 37_932_336)])
def test_full_size_keys_shapes_and_parameter_count(n_classes, n_params):
    with torch.device("meta"):
        net = build_network("VNet4SSNet", 1, n_classes, 32, has_dropout=True)
        vnet = VNet(1, n_classes, 32, "batchnorm", has_dropout=True)
    sd = net.state_dict()
    assert len(sd) == 205 + 18 + 18 * n_classes  # 475 for C = 14
    assert list(sd)[:205] == list(vnet.state_dict())  # backbone first, the original's names and order
    heads = ["projection_head", "prediction_head"] + [f"contrastive_class_selector_{c}" for c in range(n_classes)] \
        + [f"contrastive_class_selector_memory{c}" for c in range(n_classes)]  # no underscore before c
    assert list(sd)[205:] == [f"{h}.{k}" for h in heads for k in HEAD_KEYS]
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    assert shapes["projection_head.0.weight"] == (64, 32) and shapes["projection_head.3.weight"] == (64, 64)
    assert shapes["prediction_head.0.weight"] == (64, 64) and shapes["prediction_head.1.running_var"] == (64,)
    assert shapes["contrastive_class_selector_3.0.weight"] == (64, 64)
    assert shapes["contrastive_class_selector_memory0.3.weight"] == (1, 64)
    assert shapes[f"contrastive_class_selector_memory{n_classes - 1}.3.bias"] == (1,)
    assert sum(p.numel() for p in net.parameters()) == n_params


def test_train_mode_returns_logits_and_embedding_eval_mode_the_vnet_logits():
    net = tiny_net()
    x = torch.rand(2, 1, 16, 32, 32, generator=torch.Generator().manual_seed(1))
    logits, embedding = net.train()(x)
    assert logits.shape == (2, 3, 16, 32, 32) and embedding.shape == (2, 4, 16, 32, 32)
    assert torch.equal(logits, net.out_conv(embedding))  # the embedding is what out_conv classifies
    # Dropout3d(0.5) acts on the embedding in train mode: whole channels are zero
    assert any(embedding[b, ch].abs().max() == 0 for b in range(2) for ch in range(4))
    vnet = VNet(1, 3, 4, "batchnorm", has_dropout=True)
    vnet.load_state_dict({k: v for k, v in net.state_dict().items() if k in vnet.state_dict()}, strict=True)
    out = net.eval()(x)
    assert torch.is_tensor(out) and torch.equal(out, vnet.eval()(x))


# ------------------------------------------------------------------------------------------------- memory

def test_memory_keeps_the_32_lowest_scored_features_and_replaces_entries():
    net = tiny_net()
    g = torch.Generator().manual_seed(2)
    feats = torch.randn(45, 8, generator=g)
    labels = torch.tensor([2] * 20 + [1] * 5 + [2] * 20)  # class 2: 40 rows, class 1: 5 rows, interleaved
    ranker = copy.deepcopy(net.contrastive_class_selector_2)  # train mode, as the original calls it
    with torch.no_grad():
        score = torch.sigmoid(ranker(feats[labels == 2]))[:, 0]
    memory = ss.FeatureMemory(elements_per_class=32, n_classes=3)
    memory.add_features_from_sample_learned(net, feats, labels)
    order = torch.sort(score).indices  # ascending: the original keeps the *lowest* 32 despite its comment
    assert memory.memory[0] is None
    assert torch.equal(memory.memory[1], feats[labels == 1])  # <= 32 features: all of them, in order
    assert memory.memory[1].untyped_storage().nbytes() == 5 * 8 * 4  # its own storage, not a view of the batch
    assert torch.equal(memory.memory[2], feats[labels == 2][order[:32]])
    assert score[order[:32]].max() < score[order[32:]].min()
    # the ranking ran in train mode: the class-2 selector's BN counted one batch, class 1's none
    assert net.contrastive_class_selector_2[1].num_batches_tracked == 1
    assert net.contrastive_class_selector_1[1].num_batches_tracked == 0
    kept_2 = memory.memory[2]
    memory.add_features_from_sample_learned(net, feats[:3] * 7, torch.tensor([1, 1, 1]))
    assert torch.equal(memory.memory[1], feats[:3] * 7) and memory.memory[2] is kept_2  # replaced / untouched


def test_memory_keep_highest_option():
    net = tiny_net()
    feats = torch.randn(40, 8, generator=torch.Generator().manual_seed(3))
    labels = torch.full((40,), 1)
    with torch.no_grad():
        score = torch.sigmoid(copy.deepcopy(net.contrastive_class_selector_1)(feats))[:, 0]
    memory = ss.FeatureMemory(elements_per_class=32, n_classes=3, keep="highest")
    memory.add_features_from_sample_learned(net, feats, labels)
    order = torch.sort(score, descending=True).indices
    assert torch.equal(memory.memory[1], feats[order[:32]])
    assert score[order[:32]].min() > score[order[32:]].max()


# --------------------------------------------------------------------------------------- contrastive loss

def linear_selectors(n_classes=3, w=None, w_memory=None):
    """Stand-in model: selector_c(f) = f·w_c (one Linear(2, 1) without hidden layer), float64."""
    model = nn.Module()
    for c in range(n_classes):
        for prefix, weights in (("contrastive_class_selector_", w), ("contrastive_class_selector_memory", w_memory)):
            lin = nn.Linear(2, 1).double()
            with torch.no_grad():
                lin.bias.zero_()
                lin.weight.copy_(torch.tensor((weights or {}).get(c, [0.0, 0.0]), dtype=torch.float64))
            setattr(model, f"{prefix}{c}", lin)
    return model


# class 1: f = [1, 0], [0, 2]; memory [3, 0], [1, 1]  ->  D = 1 - cos = [[0, 1 - 1/√2], [1, 1 - 1/√2]]
FEATS = torch.tensor([[5.0, 5.0], [1.0, 0.0], [2.0, 1.0], [0.0, 2.0], [1.0, 3.0]], dtype=torch.float64)
LABELS = torch.tensor([0, 1, 2, 1, 2])  # class 0: one feature (skipped); class 2: no memory (skipped)
MEMORY = [torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64),
          torch.tensor([[3.0, 0.0], [1.0, 1.0]], dtype=torch.float64), None]
D = [[0.0, 1 - 1 / math.sqrt(2)], [1.0, 1 - 1 / math.sqrt(2)]]


def test_contrastive_loss_by_hand_uniform_and_learned_feature_weights():
    loss = ss.contrastive_class_to_class_learned_memory(linear_selectors(), FEATS, LABELS, 3, MEMORY)
    assert loss.item() == pytest.approx((3 - math.sqrt(2)) / 4 / 3, rel=1e-12)  # s = 1/2 -> ŝ = 1; / C = 3
    # w_1 = [ln 3, 0]: s = sigmoid(ln 3) = 3/4 and sigmoid(0) = 1/2 -> ŝ = 2s/Σs = 1.2, 0.8 (mean exactly 1)
    model = linear_selectors(w={1: [math.log(3), 0.0]})
    loss = ss.contrastive_class_to_class_learned_memory(model, FEATS, LABELS, 3, MEMORY)
    expected = (1.2 * (D[0][0] + D[0][1]) + 0.8 * (D[1][0] + D[1][1])) / 4 / 3  # = (2.8 - √2) / 12
    assert loss.item() == pytest.approx(expected, rel=1e-12) and expected == pytest.approx((2.8 - 2 ** .5) / 12)


def test_memory_side_weights_are_identically_one_unless_normalised():
    w_mem = {1: [math.log(3), 0.0]}
    base = ss.contrastive_class_to_class_learned_memory(linear_selectors(), FEATS, LABELS, 3, MEMORY)
    same = ss.contrastive_class_to_class_learned_memory(linear_selectors(w_memory=w_mem), FEATS, LABELS, 3, MEMORY)
    assert same.item() == pytest.approx(base.item(), rel=1e-12)  # r / r: the memory selector changes nothing
    fixed = ss.contrastive_class_to_class_learned_memory(linear_selectors(w_memory=w_mem), FEATS, LABELS, 3, MEMORY,
                                                         memory_weights="normalised")
    # normalised memory rows [1, 0], [1/√2, 1/√2]: r = 3/4, sigmoid(ln 3/√2); r̂ = 2r/Σr
    r = [0.75, 1 / (1 + math.exp(-math.log(3) / math.sqrt(2)))]
    r_hat = [2 * v / sum(r) for v in r]
    expected = sum(D[i][j] * r_hat[j] for i in range(2) for j in range(2)) / 4 / 3
    assert fixed.item() == pytest.approx(expected, rel=1e-12) and abs(fixed.item() - base.item()) > 1e-3


def test_contrastive_loss_zero_cases():
    model = linear_selectors(w={1: [0.3, -0.2]})
    none = ss.contrastive_class_to_class_learned_memory(model, FEATS, LABELS, 3, [None] * 3)
    assert torch.is_tensor(none) and none.item() == 0.0
    aligned = torch.tensor([[2.0, 0.0], [5.0, 0.0], [0.5, 0.0]], dtype=torch.float64)  # positive multiples
    memory = [None, torch.tensor([[1.0, 0.0], [3.0, 0.0]], dtype=torch.float64), None]
    loss = ss.contrastive_class_to_class_learned_memory(model, aligned, torch.tensor([1, 1, 1]), 3, memory)
    assert abs(loss.item()) < 1e-12
    single_row = [None, memory[1][:1], None]  # one memory row: skipped
    assert ss.contrastive_class_to_class_learned_memory(model, FEATS, LABELS, 3, single_row).item() == 0.0


def test_gradient_reaches_features_not_memory_nor_feature_selector_input():
    model = linear_selectors(w={1: [math.log(3), 0.0]}, w_memory={1: [0.5, -1.0]})
    feats = FEATS.clone().requires_grad_(True)
    memory = [m if m is None else m.clone().requires_grad_(True) for m in MEMORY]
    ss.contrastive_class_to_class_learned_memory(model, feats, LABELS, 3, memory).backward()
    assert all(m is None or m.grad is None for m in memory)  # the bank is a constant
    assert abs(model.contrastive_class_selector_memory1.weight.grad).max() < 1e-12  # d(r/r)/dr = 0
    assert abs(model.contrastive_class_selector_1.weight.grad).max() > 1e-3  # the weighting is learned
    # features receive gradient through the cosine distance only: ŝ held constant gives the same gradient
    f = FEATS[LABELS == 1].clone().requires_grad_(True)
    s_hat = torch.tensor([[1.2], [0.8]], dtype=torch.float64)
    dist = 1 - F.normalize(f, dim=1) @ F.normalize(MEMORY[1], dim=1).t()
    ((dist * s_hat).mean() / 3).backward()
    assert torch.allclose(feats.grad[LABELS == 1], f.grad, rtol=1e-12, atol=1e-15)
    assert torch.equal(feats.grad[LABELS != 1], torch.zeros_like(feats.grad[LABELS != 1]))


# ------------------------------------------------------------------------------------------------------ VAT

def hand_dice_distance(p, t):
    """−mean_c (2 Σ p·t + 1e-8) / (Σ p + Σ t + 2e-8), sums over batch and space (smooth 1e-8, background in)."""
    dims = [0, 2, 3, 4]
    return -((2 * (p * t).sum(dims) + 1e-8) / (p.sum(dims) + t.sum(dims) + 2e-8)).mean()


def test_l2_normalize_gives_unit_norm_per_sample_and_keeps_the_input():
    d = torch.randn(3, 1, 4, 5, 6, generator=torch.Generator().manual_seed(4)) * 7
    before = d.clone()
    out = ss.l2_normalize(d)
    assert torch.allclose(out.flatten(1).norm(dim=1), torch.ones(3), atol=1e-6)
    assert torch.equal(d, before) and torch.allclose(out * d.flatten(1).norm(dim=1).view(3, 1, 1, 1, 1), d)


def test_vat_with_given_direction_matches_a_finite_difference_reference():
    torch.manual_seed(5)
    model = nn.Conv3d(1, 3, 3, padding=1).double()
    g = torch.Generator().manual_seed(6)
    x = torch.rand(2, 1, 2, 3, 3, generator=g, dtype=torch.float64)
    d0 = torch.rand(x.shape, generator=g, dtype=torch.float64) - 0.5
    xi = epi = 10.0
    with torch.no_grad():
        t = F.softmax(model(x), 1)
        d_hat = d0 / (d0.flatten(1).norm(dim=1).view(2, 1, 1, 1, 1) + 1e-8)

        def distance(d):
            return hand_dice_distance(F.softmax(model(x + xi * d), 1), t).item()

        grad = torch.zeros_like(d_hat).flatten()  # central differences of the Dice distance at ξ·d̂
        for k in range(grad.numel()):
            e = torch.zeros_like(grad)
            e[k] = 1e-6
            grad[k] = (distance(d_hat + e.view_as(d_hat)) - distance(d_hat - e.view_as(d_hat))) / 2e-6
        grad = grad.view_as(d_hat)
        d_adv = grad / (grad.flatten(1).norm(dim=1).view(2, 1, 1, 1, 1) + 1e-8)
        expected = hand_dice_distance(F.softmax(model(x + epi * d_adv), 1), t).item()
        expected_ip0 = hand_dice_distance(F.softmax(model(x + epi * d_hat), 1), t).item()
    lds = ss.VAT3d(xi=10, epi=10, ip=1)(model, x, d=d0)
    assert lds.item() == pytest.approx(expected, rel=1e-7) and lds.requires_grad
    assert ss.VAT3d(xi=10, epi=10, ip=0)(model, x, d=d0).item() == pytest.approx(expected_ip0, rel=1e-10)
    assert abs(expected - expected_ip0) > 1e-6  # the adversarial step moved the direction
    scaled = ss.VAT3d(xi=10, epi=10, ip=1, grad_scale=1024.0)(model, x, d=d0)  # same direction after scaling
    assert scaled.item() == pytest.approx(expected, rel=1e-4)
    assert all(p.grad is None for p in model.parameters())  # inner gradient w.r.t. d only


def test_vat_start_direction_is_drawn_from_the_cpu_generator_on_any_device():
    """The original draws d on the CPU and moves it, so on CUDA the CPU stream advances by x.numel() numbers; the
    meta device (no draws of its own) stands in for CUDA here."""
    with torch.device("meta"):
        net = build_network("VNet4SSNet", 1, 3, 2, has_dropout=False)
    x = torch.empty(2, 1, 16, 16, 16, device="meta")
    torch.manual_seed(5)
    ss.VAT3d()(net.train(), x)
    after = torch.rand(3)
    torch.manual_seed(5)
    torch.rand(x.shape)
    assert torch.equal(after, torch.rand(3))


def test_vat_bn_statistics_only_the_target_pass_updates_them():
    net = tiny_net()
    reference = copy.deepcopy(net).train()
    x = torch.rand(2, 1, 16, 32, 32, generator=torch.Generator().manual_seed(7))
    torch.manual_seed(8)
    with torch.no_grad():
        reference(x)  # = VAT's target pass: train mode, dropout on, running statistics updated once
    torch.manual_seed(8)
    lds = ss.VAT3d(xi=10, epi=10, ip=1)(net.train(), x)
    for (name, a), b in zip(net.named_buffers(), reference.buffers()):
        assert torch.equal(a, b), name
    assert net.block_one.conv[1].num_batches_tracked == 1
    assert all(m.track_running_stats for m in net.modules() if hasattr(m, "track_running_stats"))
    assert all(p.grad is None for p in net.parameters())
    assert -1 <= lds.item() <= 0
    lds.backward()  # the LDS term itself trains the net
    assert net.block_one.conv[0].weight.grad.abs().sum() > 0


def test_frozen_bn_stats_restores_flags_after_an_error():
    net = nn.Sequential(nn.BatchNorm1d(2), nn.InstanceNorm1d(2))  # flags True / False
    with pytest.raises(RuntimeError), ss.frozen_bn_stats(net):
        assert not net[0].track_running_stats and not net[1].track_running_stats
        raise RuntimeError
    assert net[0].track_running_stats and not net[1].track_running_stats


# ------------------------------------------------------------------------------------------- training step

@pytest.mark.parametrize("sup_ce", [False, True])
def test_lambda_zero_gives_the_background_inclusive_dice_only(sup_ce):
    method = make_method(ss.SSNet, ["--sup_ce"] if sup_ce else [])
    net = method.nets["model"].train()
    x_l, y_l, x_u = tiny_batch()
    torch.manual_seed(11)
    out = method.training_step(x_l, y_l, x_u, engine.Step(0, 0, 0, 0.01, 0.0))
    torch.manual_seed(11)  # same dropout masks; train-mode BN uses batch statistics
    logits, _ = net(torch.cat([x_l, x_u]))
    one_hot = F.one_hot(y_l[:, 0], 14).permute(0, 4, 1, 2, 3).float()
    expected = hand_dice_distance(F.softmax(logits[:2], 1), one_hot)
    if sup_ce:
        expected = expected + F.cross_entropy(logits[:2], y_l[:, 0])
    assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert out["loss_dice"].item() == pytest.approx(hand_dice_distance(F.softmax(logits[:2], 1), one_hot).item(),
                                                    rel=1e-5)


def test_step_fills_the_memory_from_correct_foreground_and_it_survives_save_load(tmp_path):
    method = make_method(ss.SSNet)
    net = method.nets["model"].train()
    x_l, _, x_u = tiny_batch()
    torch.manual_seed(12)
    with torch.no_grad():
        y_l = net(torch.cat([x_l, x_u]))[0][:2].argmax(1, keepdim=True)  # labels = the prediction: all correct
    torch.manual_seed(12)
    out = method.training_step(x_l, y_l, x_u, engine.Step(0, 0, 0, 0.01, 1.0))
    counts = torch.bincount(y_l.flatten(), minlength=14)
    memory = method.memory.memory
    assert memory[0] is None and counts[1:].sum() > 0
    for c in range(1, 14):
        assert (memory[c] is None) == (counts[c] == 0), c
        if memory[c] is not None:
            assert memory[c].shape == (min(32, int(counts[c])), 8) and not memory[c].requires_grad
    assert out["loss_con_l"].item() > 0 and out["loss"].requires_grad
    torch.save(method.state_dict(), tmp_path / "state.pth")
    restored = make_method(ss.SSNet)
    restored.load_state_dict(torch.load(tmp_path / "state.pth", weights_only=False))
    for a, b in zip(memory, restored.memory.memory):
        assert (a is None and b is None) or (a.dtype == b.dtype and torch.equal(a, b))


# ------------------------------------------------------------------------------------------------ test.py

def test_test_py_runs_the_vnet4ssnet_logits_from_run_json(env):  # noqa: F811 (env: the fixture)
    task, root = env
    net = tiny_net(n_classes=14, seed=13)
    with torch.no_grad():  # random BN statistics so the eval-mode outputs are not trivial
        for name, buf in net.named_buffers():
            if name.endswith("running_var"):
                buf.uniform_(0.5, 1.5)
    exp = "Task_phantom_20p/ssnet/fold1"
    network = {"name": "VNet4SSNet", "n_channels": 1, "n_classes": 14, "n_filters": 4, "normalization": "batchnorm"}
    folder = make_exp(root, exp, net.state_dict(), network, keys=None)  # bare checkpoint (strict load)
    assert cli.main(["--task", "phantom", "--exp", exp, "--device", "cpu", "--cps", "AB"]) == 0
    for case_id in ("0001", "0002"):
        pred, _ = read_pred(folder / "predictions_AB" / f"{case_id}.nii.gz")
        expected = expected_labels(task, case_id, [net.eval()], PATCH)
        assert pred.shape == expected.shape and (pred == expected).all()
