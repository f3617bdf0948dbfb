"""Fault injection on tiny data: every entry point either does the right thing or stops with one ``error:`` line,
exit code 2, and leaves earlier good files byte-identical (truncated NIfTI, non-finite losses, failed resume,
concurrent or repeated writers, interrupted test.py, flag edge cases, full disk, unwritable output, out of memory),
plus the split lists shipped from the original and the validation loader's draw from the global generator."""
import errno
import gzip
import os
import shutil
import subprocess
import sys
import types

import numpy as np
import pytest
import torch

import engine
import evaluate_Ntimes
import test as test_script
from conftest import FAST, REPO, tiny_data as make_tiny_data
from data import preprocess
from train_fully import Fully
from utils import io as uio
from utils.io import DataError, FolderLock, read_list, read_nifti
from utils.runinfo import build_parser, resolve_config
from utils.validation import validate

RUN = FAST + ["-sl", "labeled_20p", "--eval_every", "100"]  # Fully, 2 labeled cases: one iteration per epoch


# ------------------------------------------------------------------------------------------------ helpers

@pytest.fixture(autouse=True)
def fresh_logging():
    """test.py's logging.basicConfig keeps a handler on an earlier test's captured stderr: start without one."""
    import logging
    logging.getLogger().handlers.clear()


def train(exp, *extra):
    return engine.run(Fully, RUN + ["--exp", exp, *extra])


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    """One finished run (Fully, -ep 0) on the tiny data, trained once for the module and copied by ``trained``."""
    root = tmp_path_factory.mktemp("template")
    with pytest.MonkeyPatch.context() as mp:
        make_tiny_data.__wrapped__(root, mp)
        train("base", "-ep", "0")
    return root / "logs" / "base"


def trained(tiny_data, template, exp):
    """A finished run at ``logs/<exp>`` (the tiny data is the same in every test: seeded)."""
    shutil.copytree(template, tiny_data / "logs" / exp)
    return tiny_data / "logs" / exp


def fails(capsys, func, *args):
    """Run an entry point that must stop with exit code 2 and one ``error:`` line; returns that line."""
    with pytest.raises(SystemExit) as info:
        func(*args)
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def cli_fails(capsys, main, argv, code=2):
    """As ``fails`` for a ``cli_main`` entry point (returns its code; its log lines also go to stderr)."""
    assert main(argv) == code
    err = capsys.readouterr().err.strip().splitlines()
    assert "Traceback (most recent call last):" not in err and err[-1].startswith("error: " if code == 2 else ""), err
    assert sum(line.startswith("error: ") for line in err) == (code == 2), err
    return err[-1]


def snapshot(folder):
    """{relative path: bytes} of every file under ``folder`` except the lock."""
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            if name != FolderLock.NAME:
                path = os.path.join(root, name)
                with open(path, "rb") as f:
                    out[os.path.relpath(path, folder)] = f.read()
    return out


def dead_pid():
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(proc.stdout)


def write_nii(path, array, spacing=(1.0, 1.0, 1.0)):
    import SimpleITK as sitk
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    sitk.WriteImage(image, str(path), True)


def truncate(path, keep=0.6):
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[:int(len(data) * keep)])


# ------------------------------------------------------------------------------- 1. truncated / corrupt NIfTI

@pytest.mark.parametrize("dtype", [np.int16, np.float32, np.uint8])
def test_truncated_or_corrupt_nifti_is_an_error_not_zeros(tmp_path, dtype):
    rng = np.random.default_rng(0)
    array = rng.integers(1, 200, (12, 40, 40)).astype(dtype)  # random: gzip cannot shrink it much
    good = tmp_path / "good.nii.gz"
    write_nii(good, array)
    assert np.array_equal(read_nifti(good)[0], array)
    cut = tmp_path / "cut.nii.gz"
    cut.write_bytes(good.read_bytes())
    truncate(cut)
    with pytest.raises(DataError, match="truncated"):
        read_nifti(cut)
    raw = gzip.decompress(good.read_bytes())  # uncompressed .nii cut inside the voxel data
    (tmp_path / "cut.nii").write_bytes(raw[:len(raw) - 100])
    with pytest.raises(DataError, match=r"unreadable NIfTI \(truncated: \d+ of \d+ bytes"):
        read_nifti(tmp_path / "cut.nii")
    bad = bytearray(good.read_bytes())
    bad[len(bad) // 2] ^= 0xFF  # one flipped byte in the deflate stream: CRC or stream error
    (tmp_path / "flip.nii.gz").write_bytes(bytes(bad))
    with pytest.raises(DataError, match="corrupt|truncated"):
        read_nifti(tmp_path / "flip.nii.gz")


def raw_synapse(folder, n=6):
    rng = np.random.default_rng(1)
    for i in range(1, n + 1):
        label = np.zeros((8, 16, 16), np.uint8)
        label[2:6, 4:12, 4:12] = 1 + i % 3
        image = rng.integers(-100, 300, label.shape).astype(np.int16)
        write_nii(folder / "imagesTr" / f"img{i:04d}.nii.gz", image)
        write_nii(folder / "labelsTr" / f"label{i:04d}.nii.gz", label)


def test_preprocess_truncated_label_stops_and_keeps_good_output(tmp_path, capsys):
    raw, out = tmp_path / "raw", tmp_path / "out"
    raw_synapse(raw)
    argv = ["--task", "phantom", "--raw", str(raw), "--out", str(out), "--ratios", "20"]
    assert preprocess.main(argv) == 0
    before = snapshot(out)
    truncate(raw / "labelsTr" / "label0003.nii.gz")
    err = cli_fails(capsys, preprocess.main, argv + ["--force"])
    assert "label0003.nii.gz: unreadable NIfTI (truncated" in err
    assert snapshot(out) == before
    assert [n for n in os.listdir(tmp_path) if n.startswith(".")] == []  # staging removed


def test_evaluate_truncated_prediction_is_an_error(tiny_data, capsys):
    task = evaluate_Ntimes.get_task("phantom")
    (tiny_data / "data" / "splits" / "test.txt").write_text("0007\n0008\n")
    fold = tiny_data / "logs" / "e" / "fold1" / "predictions_AB"
    for case in ("0007", "0008"):  # perfect predictions on the evaluation grid (phantom: halved in-plane)
        write_nii(fold / f"{case}.nii.gz", np.load(tiny_data / "data" / "npy" / f"{case}_label.npy")[:, ::2, ::2]
                  .astype(np.uint8))
    argv = ["--task", "phantom", "--exp", "e", "--folds", "1", "--cps", "AB", "--gt", "npy", "--no-progress"]
    assert evaluate_Ntimes.main(argv, task=task) == 0
    result = tiny_data / "logs" / "e" / "evaluation_res.txt"
    good = result.read_bytes()
    assert b"Final Avg Dice: " in good
    truncate(fold / "0008.nii.gz")
    err = cli_fails(capsys, evaluate_Ntimes.main, argv)
    assert "0008.nii.gz: unreadable NIfTI (truncated" in err
    assert result.read_bytes() == good


# ------------------------------------------------------------------------------------ 2. non-finite losses

def test_nonfinite_losses_are_counted_across_epochs(tiny_data, capsys, monkeypatch):
    """Six iterations per epoch (6 cases, batch 1): 20 NaN losses in a row span 4 epochs and stop the run (the
    count used to reset every epoch, so with fewer than 20 iterations per epoch a run never stopped)."""
    monkeypatch.setattr(Fully, "training_step", lambda self, x_l, y_l, x_u, step: {"loss": torch.tensor(float("nan"))})
    err = fails(capsys, train, "nan", "-ep", "5", "--batch_size", "1", "-sl", "train")
    assert "20 non-finite losses in a row (epoch 3, iteration 1)" in err  # 3 * 6 + 2
    last = torch.load(tiny_data / "logs" / "nan" / "ckpts" / "last.pth", weights_only=False)
    assert last["epoch"] == 2 and last["nonfinite_row"] == 18 and last["nonfinite_total"] == 18


def test_amp_nonfinite_step_still_lowers_the_loss_scale():
    """Under AMP the original's GradScaler sees the NaN step: the step is skipped and the scale halves."""
    net = torch.nn.Linear(3, 1)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    method = types.SimpleNamespace(
        training_step=lambda *a: {"loss": net(torch.ones(1, 3)).sum() * float("nan")},
        after_optimizer_step=lambda step: pytest.fail("no after-step hook for a skipped step"))
    opt = {"A": torch.optim.SGD(net.parameters(), lr=0.1)}
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    cfg = types.SimpleNamespace(device=torch.device("cpu"), amp=True)
    assert engine.optimize_step(method, opt, scaler, cfg, None, None, None, None) is None
    assert scaler.get_scale() == 512.0  # backoff factor 0.5
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


# ---------------------------------------------------------------------------------------- 3. failed resume

def test_failed_resume_leaves_the_finished_run_untouched(tiny_data, template, capsys):
    from train_dhc import DHC
    folder = trained(tiny_data, template, "r")
    before = snapshot(folder)
    err = fails(capsys, train, "r", "-ep", "1", "--resume", "--n_filters", "8")
    assert "cannot resume" in err and "n_filters 4 (now 8)" in err
    err = fails(capsys, engine.run, DHC, FAST + ["--exp", "r", "--resume"])  # the wrong method script
    assert "method 'fully' (now 'dhc')" in err
    assert snapshot(folder) == before
    (folder / "ckpts" / "last.pth").write_bytes(before["ckpts/last.pth"][:5000])  # cut short
    err = fails(capsys, train, "r", "-ep", "1", "--resume")
    assert "last.pth: unreadable checkpoint" in err
    assert {k: v for k, v in snapshot(folder).items() if k != "ckpts/last.pth"} == \
        {k: v for k, v in before.items() if k != "ckpts/last.pth"}


def test_resume_without_last_pth_creates_nothing(tiny_data, capsys):
    err = fails(capsys, train, "none", "--resume")
    assert "last.pth: no checkpoint to resume from" in err
    assert not (tiny_data / "logs" / "none").exists()


# -------------------------------------------------------------------------------- 4. one writer per run folder

def test_second_writer_is_refused_and_a_killed_holder_does_not_block(tiny_data, capsys):
    folder = tiny_data / "logs" / "lock"
    folder.mkdir(parents=True)
    with FolderLock(str(folder)):  # another writer holds the folder (flock conflicts across descriptors)
        err = fails(capsys, train, "lock", "-ep", "0")
    assert "another process is writing" in err and not (folder / "ckpts").exists()
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, os, sys, time; "
                               f"fd = os.open({str(folder / '.lock')!r}, os.O_RDWR); "
                               "fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    fails(capsys, train, "lock", "-ep", "0")
    holder.kill()  # kill -9: the kernel releases the lock
    holder.wait()
    FolderLock(str(folder)).release()  # free again: a lock is never stale


def test_finished_run_needs_overwrite_which_clears_old_predictions(tiny_data, template, capsys):
    folder = trained(tiny_data, template, "o")
    (folder / "predictions_AB").mkdir()
    (folder / "predictions_AB" / "0007.nii.gz").write_bytes(b"old")
    before = snapshot(folder)
    err = fails(capsys, train, "o", "-ep", "0")
    assert "holds a trained run (ckpts/best_model.pth)" in err and "--overwrite" in err
    assert snapshot(folder) == before
    train("o", "-ep", "0", "--overwrite")
    assert not (folder / "predictions_AB").exists()
    assert (folder / "train.log").read_text().count("epoch 0 |") == 1  # the old log is gone, not appended to


# ------------------------------------------------------------------------------- 5. interrupted test.py

def test_interrupted_test_keeps_the_previous_prediction_set(tiny_data, template, capsys, monkeypatch):
    trained(tiny_data, template, "t")
    argv = ["--task", "phantom", "--exp", "t", "--split", "eval", "--device", "cpu", "--cps", "AB"]
    assert test_script.main(argv) == 0
    folder = tiny_data / "logs" / "t"
    before = snapshot(folder / "predictions_AB")
    assert sorted(before) == ["0007.nii.gz", "0008.nii.gz"]
    stale = folder / f".tmp-{dead_pid()}-predictions_AB"  # what a kill -9 during an earlier test run leaves
    stale.mkdir()
    (stale / "0007.nii.gz").write_bytes(b"half")
    written = []

    def write_then_interrupt(path, labels, geometry):
        if written:
            raise KeyboardInterrupt  # Ctrl-C while the second case is written
        written.append(path)
        (tiny_data / "new.nii.gz").write_bytes(b"x")

    monkeypatch.setattr(test_script, "write_prediction", write_then_interrupt)
    assert cli_fails(capsys, test_script.main, argv, code=130) == "interrupted"
    assert snapshot(folder / "predictions_AB") == before
    assert [n for n in os.listdir(folder) if n.startswith(".tmp-")] == []  # own staging and the stale one


# ----------------------------------------------------------------------------------------- 6. flag edges

def test_flag_edges(tiny_data, template, capsys):
    def cfg(*argv):
        return resolve_config(Fully, build_parser(Fully).parse_args(RUN + list(argv)))
    assert cfg("-ep", "0").max_epoch == 0  # one epoch (0..0), not the task's default
    assert cfg("-ep", "3", "-r", "-cr", "0").rampup_length == 0  # no ramp: full weight at once
    assert cfg("-ep", "3", "-r").rampup_length == 3
    for flags, name in ((["-ep", "-1"], "-ep/--max_epoch -1: must be >= 0"),
                        (["--eval_every", "0"], "--eval_every 0: must be >= 1"),
                        (["--batch_size", "0"], "--batch_size 0: must be >= 1")):
        assert name in fails(capsys, train, "flags", *flags)
    assert cfg("-m").amp and cfg("-m").device.type == "cpu"  # the original's AMP flag: fp16 autocast on the CPU too
    assert not (tiny_data / "logs" / "flags").exists()
    log = (template / "train.log").read_text()  # trained with -ep 0
    assert "epoch 0 |" in log and "epoch 1 |" not in log and "epochs 0..0" in log
    assert torch.load(template / "ckpts" / "last.pth", weights_only=False)["epoch"] == 0


# ------------------------------------------------------------------------ disk full, unwritable, out of memory

def test_disk_full_at_checkpoint_write_keeps_the_previous_checkpoint(tiny_data, template, capsys, monkeypatch):
    ckpts = trained(tiny_data, template, "d") / "ckpts"
    before = snapshot(ckpts)
    (ckpts / f".tmp-{dead_pid()}-last.pth").write_bytes(b"half")  # left by a killed run: removed on resume

    def full(path, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(uio, "write_bytes", full)
    err = fails(capsys, train, "d", "-ep", "1", "--resume")
    assert "last.pth: no space left on device: the disk is full" in err
    assert snapshot(ckpts) == before


def test_disk_full_in_preprocessing_names_it(tmp_path, capsys, monkeypatch):
    raw, out = tmp_path / "raw", tmp_path / "out"
    raw_synapse(raw)
    stale = tmp_path / f".preprocess-staging-{dead_pid()}-x"
    stale.mkdir()

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(np, "save", full)
    err = cli_fails(capsys, preprocess.main, ["--task", "phantom", "--raw", str(raw), "--out", str(out)])
    assert err.endswith("_image.npy: no space left on device: the disk is full; free space and run again")
    assert not out.exists() and not stale.exists()


def test_unwritable_outputs_are_one_line(tiny_data, template, capsys, monkeypatch):
    (tiny_data / "file").write_text("")
    monkeypatch.setenv("DHC_LOG_ROOT", str(tiny_data / "file"))  # logs root is a file
    err = fails(capsys, train, "x", "-ep", "0")
    assert err.endswith("file/x: a path component is a file, not a folder")
    monkeypatch.setenv("DHC_LOG_ROOT", str(tiny_data / "logs"))
    trained(tiny_data, template, "w")
    (tiny_data / "logs" / "w" / "predictions_AB").write_text("a file")
    argv = ["--task", "phantom", "--exp", "w", "--split", "eval", "--device", "cpu", "--cps", "AB"]
    assert "predictions_AB: exists and is not a folder" in cli_fails(capsys, test_script.main, argv)

    def read_only(path, text):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), path)

    monkeypatch.setattr(evaluate_Ntimes, "write_text", read_only)
    monkeypatch.setattr(evaluate_Ntimes, "evaluate", lambda *a: {"files": {"evaluation_res.txt": ""}})
    err = cli_fails(capsys, evaluate_Ntimes.main, ["--task", "phantom", "--exp", "w"])
    assert err.endswith("evaluation_res.txt: read-only file system: choose a writable output folder")


def test_out_of_memory_names_the_sizes(tiny_data, template, capsys, monkeypatch):
    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    trained(tiny_data, template, "m")
    monkeypatch.setattr(test_script, "sliding_window_predict", oom)
    err = cli_fails(capsys, test_script.main, ["--task", "phantom", "--exp", "m", "--split", "eval",
                                               "--device", "cpu", "--sw_batch_size", "3"])
    assert "out of memory on cpu in the sliding window" in err and "--sw_batch_size 3" in err
    monkeypatch.setattr(Fully, "training_step", oom)
    err = fails(capsys, train, "m2", "-ep", "0")
    assert err == ("error: out of memory on cpu with --batch_size 4 (per loader), --patch_size 16 32 32, "
                   "--n_filters 4: lower --batch_size or --patch_size (or --n_filters)")


# --------------------------------------------------------------------------------- splits and the random stream

def test_shipped_split_lists_are_the_originals_and_consistent():
    from data.preprocess import ORIGINAL_TEST
    from data.preprocess_common import shipped_splits
    amos = os.path.join(REPO, "amos_data", "splits")
    lists = {n[:-4]: read_list(os.path.join(amos, n)) for n in os.listdir(amos) if n.endswith(".txt")}
    assert {n: len(v) for n, v in lists.items()} == {
        "train": 216, "eval": 24, "test": 120, "labeled_2p": 4, "unlabeled_2p": 212, "labeled_5p": 10,
        "unlabeled_5p": 206, "labeled_10p": 21, "unlabeled_10p": 195}  # no 20 % pair: it holds eval ids
    train, evals, test = (set(lists[n]) for n in ("train", "eval", "test"))
    assert not train & evals and not train & test and not evals & test
    for p in (2, 5, 10):
        lab, unl = set(lists[f"labeled_{p}p"]), set(lists[f"unlabeled_{p}p"])
        assert lab | unl == train and not lab & unl
    assert read_list(os.path.join(REPO, "synapse_data", "splits", "test.txt")) == list(ORIGINAL_TEST)
    everything = train | evals | test
    assert shipped_splits("amos_data", everything, (2, 5, 10)) == lists
    assert shipped_splits("amos_data", everything - {"amos_0001"}, (2, 5, 10)) is None  # other data: seeded
    tracked = subprocess.run(["git", "ls-files", "--others", "--ignored", "--exclude-standard", "amos_data",
                              "synapse_data"], cwd=REPO, capture_output=True, text=True).stdout.split()
    assert not [t for t in tracked if t.endswith(".txt") and t[:-4].split("/")[-1] in lists]  # not git-ignored


def test_training_on_eval_cases_is_refused(tiny_data, capsys):
    (tiny_data / "data" / "splits" / "labeled_20p.txt").write_text("0001\n0007\n")  # 0007 is an eval case
    err = fails(capsys, train, "leak", "-ep", "0")
    assert "labeled_20p.txt: shares 1 ids with" in err and "eval.txt (0007)" in err


def test_validation_draws_once_from_the_global_generator_like_a_dataloader(tiny_data):
    """The original iterates a DataLoader per validation: its iterator draws one int64 base seed."""
    from data.dataset import VolumeDataset
    from data.transforms import make_eval_transform
    task = evaluate_Ntimes.get_task("phantom")
    ds = VolumeDataset(task, "eval", transform=make_eval_transform(task, (16, 32, 32)))
    net = torch.nn.Conv3d(1, 14, 1)
    method = types.SimpleNamespace(nets={"A": net}, predict=net)
    torch.manual_seed(5)
    dice = validate(method, ds, 14, torch.device("cpu"))
    after = torch.rand(3)
    torch.manual_seed(5)
    for _ in torch.utils.data.DataLoader(ds, batch_size=1):  # the original's eval loader
        pass
    assert torch.equal(after, torch.rand(3))
    torch.manual_seed(5)
    torch.empty((), dtype=torch.int64).random_()  # = exactly one draw
    assert torch.equal(after, torch.rand(3)) and dice.shape == (13,)


def test_zero_weight_ce_terms_reach_train_log(caplog):
    stub = types.SimpleNamespace(writer=engine._NullWriter(), cfg=types.SimpleNamespace(task=None))
    with caplog.at_level("INFO", logger="engine"):
        engine.Trainer.log_epoch(stub, 3, 0.01, 0.1, {"loss": 1.5}, {"zero_weight_ce_terms": torch.tensor(2)})
    assert "epoch 3 | lr 0.010000 | cps_w 0.1000 | loss 1.5000 | zero_weight_ce_terms 2" in caplog.text
