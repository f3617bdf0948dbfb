"""Fault injection, second pass: inputs that disagree (image and label grids, non-integer npy labels, flags that
contradict run.json), runs that would never train, interrupts and damaged files that must end in one line (README:
"Reliability: what is locked, atomic and detected"). Tiny data as tests/test_faults.py, whose helpers this reuses."""
import json
import os
import signal

import numpy as np
import pytest
import SimpleITK as sitk
import torch

import engine
import evaluate_Ntimes
import test as test_script
from data import preprocess
from test_faults import (RUN, cli_fails, fails, fresh_logging, raw_synapse, snapshot, template, train,  # noqa: F401
                         trained, truncate, write_nii)
from train_adsh import ADSHCoTraining
from train_fully import Fully
from utils.geometry import Grid, align_label
from utils.io import DataError, read_list


def reoriented(array, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0)):
    """The same physical label stored in another orientation: x axis reversed by the direction matrix, the array
    flipped along it and the origin moved to the other end (identity-direction source grid)."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(array[:, :, ::-1]))
    image.SetSpacing(spacing)
    image.SetOrigin((origin[0] + (array.shape[2] - 1) * spacing[0], origin[1], origin[2]))
    image.SetDirection((-1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
    return image


def write_itk(path, image):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    sitk.WriteImage(image, str(path), True)


# ------------------------------------------------------------------------ 1. image and label grids

def test_preprocess_reindexes_a_label_stored_in_another_orientation(tmp_path, capsys):
    raw, out = tmp_path / "raw", tmp_path / "out"
    raw_synapse(raw)
    label = sitk.GetArrayFromImage(sitk.ReadImage(str(raw / "labelsTr" / "label0003.nii.gz")))
    label[1, 2, 3] = 3  # asymmetric along x, so a mirrored pair would show
    write_nii(raw / "labelsTr" / "label0003.nii.gz", label)  # the image grid (spacing 1, origin 0, identity)
    write_itk(raw / "labelsTr" / "label0003.nii.gz", reoriented(label))
    assert preprocess.main(["--task", "phantom", "--raw", str(raw), "--out", str(out), "--ratios", "20"]) == 0
    np.testing.assert_array_equal(np.load(out / "npy" / "0003_label.npy"), label)  # not mirrored
    assert "label0003.nii.gz: stored in another orientation" in capsys.readouterr().out
    assert "re-indexed" in json.loads((out / "npy" / "0003_meta.json").read_text())["label_reindexed"]


@pytest.mark.parametrize("change, field", [
    (lambda img: img.SetSpacing((1.0, 1.0, 1.2)), "spacing [1, 1, 1.2] vs [1, 1, 1] mm"),
    (lambda img: img.SetOrigin((0.0, 0.5, 0.0)), "origin [0, 0.5, 0] vs [0, 0, 0] mm"),
    (lambda img: img.SetDirection((-1.0, 0, 0, 0, 1, 0, 0, 0, 1)), "direction [-1, 0, 0, 0, 1, 0, 0, 0, 1] vs"),
])
def test_preprocess_refuses_a_label_that_does_not_overlay(tmp_path, capsys, change, field):
    raw, out = tmp_path / "raw", tmp_path / "out"
    raw_synapse(raw)
    path = raw / "labelsTr" / "label0004.nii.gz"
    label = sitk.ReadImage(str(path))
    change(label)  # a flip without moving the origin covers other voxels: refused, not re-indexed
    write_itk(path, label)
    err = cli_fails(capsys, preprocess.main, ["--task", "phantom", "--raw", str(raw), "--out", str(out)])
    assert f"{path}: label grid differs from the image's ({raw / 'imagesTr' / 'img0004.nii.gz'}): {field}" in err
    assert "do not overlay (tolerance: spacing 0.01 %, direction 1e-4, origin 0.01 voxel)" in err
    assert not out.exists()


def test_float32_header_noise_is_within_the_tolerance():
    grid = Grid((4, 3, 2), (0.7, 0.7, 2.5), (-250.0, 30.0, 10.0), (1.0, 0, 0, 0, 1, 0, 0, 0, 1))
    noisy = Grid((4, 3, 2), tuple(np.float32(grid.spacing) * (1 + 1e-6)), (-250.00003, 30.00001, 10.0),
                 (1.0, 1e-6, 0, -1e-6, 1, 0, 0, 0, 1))
    label = np.arange(24).reshape(2, 3, 4)
    assert align_label(label, noisy, grid, "l", "i") == (label, None)


def evaluation_data(tiny_data, spacing=(1.0, 1.0, 2.0)):
    """Test split 0007/0008 with meta.json (identity direction) and perfect predictions on the evaluation grid."""
    (tiny_data / "data" / "splits" / "test.txt").write_text("0007\n0008\n")
    labels = {}
    for case in ("0007", "0008"):
        labels[case] = np.load(tiny_data / "data" / "npy" / f"{case}_label.npy").astype(np.uint8)
        meta = {"spacing": list(spacing), "origin": [0.0, 0.0, 0.0], "direction": [1, 0, 0, 0, 1, 0, 0, 0, 1],
                "shape": list(labels[case].shape), "source_shape": list(labels[case].shape)}
        (tiny_data / "data" / "npy" / f"{case}_meta.json").write_text(json.dumps(meta))
        write_nii(tiny_data / "logs" / "e" / "fold1" / "predictions_AB" / f"{case}.nii.gz", labels[case][:, ::2, ::2])
    return labels


def test_evaluation_against_raw_labels_checks_their_grid(tiny_data, capsys, caplog, monkeypatch):
    monkeypatch.setenv("DHC_PHANTOM_RAW", str(tiny_data / "raw"))
    labels = evaluation_data(tiny_data)
    for case in ("0007", "0008"):
        write_itk(tiny_data / "raw" / "labelsTr" / f"label{case}.nii.gz", reoriented(labels[case], (1.0, 1.0, 2.0)))
    argv = ["--task", "phantom", "--exp", "e", "--folds", "1", "--cps", "AB", "--gt", "raw", "--no-progress"]
    assert evaluate_Ntimes.main(argv) == 0
    assert "label0007.nii.gz: stored in another orientation than the image" in caplog.text
    result = json.loads((tiny_data / "logs" / "e" / "results.json").read_text())
    assert result["standard"]["dice"]["mean"] == 100.0  # mirrored masks would score far lower
    bad = sitk.GetImageFromArray(labels["0008"])
    bad.SetSpacing((1.0, 1.0, 3.0))  # another scan's header
    write_itk(tiny_data / "raw" / "labelsTr" / "label0008.nii.gz", bad)
    err = cli_fails(capsys, evaluate_Ntimes.main, argv)
    assert "label0008.nii.gz: label grid differs from the image's" in err and "0008_meta.json): spacing" in err


# ------------------------------------------------------------------------ 2. non-integer npy labels

def test_non_integer_npy_labels_are_refused_by_training_and_evaluation(tiny_data, capsys):
    npy = tiny_data / "data" / "npy"
    label = np.load(npy / "0001_label.npy").astype(np.float32)
    label[label == 1] = 1.5  # the loader would round the spleen into class 2
    np.save(npy / "0001_label.npy", label)
    assert "0001_label.npy: non-integer label values" in fails(capsys, train, "f", "-ep", "0")
    assert not (tiny_data / "logs" / "f").exists()
    evaluation_data(tiny_data)
    np.save(npy / "0008_label.npy", np.load(npy / "0008_label.npy").astype(np.float32) * 1.5)
    err = cli_fails(capsys, evaluate_Ntimes.main, ["--task", "phantom", "--exp", "e", "--folds", "1", "--cps",
                                                   "AB", "--gt", "npy", "--no-progress"])
    assert "0008_label.npy: label map has non-integer values" in err


def test_evaluation_reads_npy_labels_with_the_checked_reader(tiny_data, capsys):
    evaluation_data(tiny_data)
    truncate(tiny_data / "data" / "npy" / "0008_label.npy")
    err = cli_fails(capsys, evaluate_Ntimes.main, ["--task", "phantom", "--exp", "e", "--folds", "1", "--cps",
                                                   "AB", "--gt", "npy", "--no-progress"])
    assert "0008_label.npy: unreadable npy file" in err


# ------------------------------------------------------------------------ 3. resume with other settings

def test_resume_refuses_contradicting_flags_and_keeps_the_record(tiny_data, template, capsys):
    folder = trained(tiny_data, template, "r")
    before = snapshot(folder)
    err = fails(capsys, train, "r", "-ep", "2", "--resume", "--base_lr", "0.5", "--seed", "3", "-sl", "train")
    assert "run.json: cannot resume with other settings than the run's" in err
    assert "--base_lr 0.5 (run: 0.001)" in err and "--seed 3 (run: 0)" in err
    assert "--split_labeled train (run: labeled_20p)" in err
    assert snapshot(folder) == before
    train("r", "-ep", "1", "--resume")  # -ep may be raised
    info = json.loads((folder / "run.json").read_text())
    assert info["args"]["max_epoch"] == 1 and info["resumes"] == [{"epoch": 1, "changed": {"max_epoch": [0, 1]}}]
    err = fails(capsys, train, "r", "-ep", "1", "--resume")  # nothing left to train
    assert "-ep/--max_epoch 1: " in err and "already holds epoch 1, the run's last; raise -ep" in err


def test_resume_of_an_early_stopped_run_is_refused(tiny_data, template, capsys, monkeypatch):
    folder = trained(tiny_data, template, "s")
    state = torch.load(folder / "ckpts" / "last.pth", weights_only=False)
    state.update(epoch=100, best_epoch=0)  # validated at epoch 100 (--eval_every 100), 100 epochs without gain
    torch.save(state, folder / "ckpts" / "last.pth")
    monkeypatch.setattr(Fully, "early_stop", True)
    err = fails(capsys, train, "s", "-ep", "300", "--resume")
    assert "the run stopped early at epoch 100 (no improvement for 100 epochs)" in err


def test_resume_with_run_json_not_an_object(tiny_data, template, capsys):
    folder = trained(tiny_data, template, "j")
    (folder / "run.json").write_text("[1, 2]\n")
    assert "run.json: not a run config (expected a JSON object" in fails(capsys, train, "j", "-ep", "1", "--resume")


# ------------------------------------------------------------------------ 4. runs that never train

def test_an_epoch_without_iterations_is_refused_before_anything_is_written(tiny_data, capsys):
    err = fails(capsys, engine.run, ADSHCoTraining, RUN + ["--exp", "adsh", "-ep", "0", "--batch_size", "5"])
    assert err == (f"error: --batch_size 5: an epoch would have no training iteration: "
                   f"{tiny_data / 'data' / 'splits' / 'unlabeled_20p.txt'} gives 4 samples, fewer than one batch, and "
                   "adsh drops incomplete batches; lower --batch_size to at most 4 or use a larger split")
    assert not (tiny_data / "logs" / "adsh").exists()


# ------------------------------------------------------------------------ tracebacks where a line is promised

@pytest.mark.parametrize("sig, line, code", [(None, "interrupted", 130), (signal.SIGTERM, "terminated", 143)])
def test_interrupted_training_is_one_line_and_keeps_last_pth(tiny_data, capsys, monkeypatch, sig, line, code):
    step = Fully.training_step

    def interrupt_in_epoch_1(self, x_l, y_l, x_u, s):
        if s.epoch == 1:
            if sig is None:
                raise KeyboardInterrupt  # Ctrl-C
            os.kill(os.getpid(), sig)
        return step(self, x_l, y_l, x_u, s)

    monkeypatch.setattr(Fully, "training_step", interrupt_in_epoch_1)
    outcome, previous = None, signal.signal(signal.SIGTERM, lambda *a: pytest.fail("SIGTERM reached the test"))
    try:
        train("i", "-ep", "3")
    except BaseException as e:  # a KeyboardInterrupt escaping here would stop pytest itself
        outcome = e
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert isinstance(outcome, SystemExit) and outcome.code == code, repr(outcome)
    assert capsys.readouterr().err.strip().splitlines() == [line]
    assert torch.load(tiny_data / "logs" / "i" / "ckpts" / "last.pth", weights_only=False)["epoch"] == 0
    assert not [n for n in os.listdir(tiny_data / "logs" / "i" / "ckpts") if n.startswith(".tmp-")]


@pytest.mark.parametrize("content, problem", [
    (b"hello, not a checkpoint" * 10, "not a PyTorch checkpoint (neither a zip archive nor a pickle"),
    (None, "truncated or corrupt zip archive"),
])
def test_garbage_best_model_says_what_is_wrong(tiny_data, template, capsys, content, problem):
    path = trained(tiny_data, template, "g") / "ckpts" / "best_model.pth"
    path.write_bytes(content if content is not None else path.read_bytes()[:3000])
    err = cli_fails(capsys, test_script.main, ["--task", "phantom", "--exp", "g", "--split", "eval",
                                               "--device", "cpu"])
    assert f"best_model.pth: unreadable checkpoint: {problem}" in err and "weights_only" not in err


# ------------------------------------------------------------------------ smaller

def test_rerun_of_preprocessing_converts_damaged_kept_files_again(tmp_path, capsys):
    raw, out = tmp_path / "raw", tmp_path / "out"
    raw_synapse(raw)
    argv = ["--task", "phantom", "--raw", str(raw), "--out", str(out), "--ratios", "20"]
    assert preprocess.main(argv) == 0
    good = (out / "npy" / "0002_label.npy").read_bytes()
    truncate(out / "npy" / "0002_label.npy")
    capsys.readouterr()
    assert preprocess.main(argv) == 0
    text = capsys.readouterr().out
    assert "1 written, 5 already there" in text
    assert "converted again: " in text and "0002_label.npy: " in text
    assert (out / "npy" / "0002_label.npy").read_bytes() == good


def test_split_files_bom_duplicates_and_binary(tmp_path):
    path = tmp_path / "s.txt"
    path.write_bytes("\ufeff0002\r\n0001\n".encode("utf-8"))  # Windows editors write a byte order mark
    assert read_list(path) == ["0001", "0002"]
    path.write_text("0001\n0002\n0001\n")
    with pytest.raises(DataError, match="ids listed more than once: 0001"):
        read_list(path)
    path.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe")
    with pytest.raises(DataError, match="not a UTF-8 text file"):
        read_list(path)


def test_evaluate_writes_no_progress_bar_to_redirected_stderr(tiny_data, capsys):
    evaluation_data(tiny_data)
    assert evaluate_Ntimes.main(["--task", "phantom", "--exp", "e", "--folds", "1", "--cps", "AB",
                                 "--gt", "npy"]) == 0
    err = capsys.readouterr().err
    assert "\r" not in err and "evaluating" not in err


def test_sigterm_to_test_py_removes_its_staging_folder(tiny_data, template, capsys, monkeypatch):
    folder = trained(tiny_data, template, "t")
    argv = ["--task", "phantom", "--exp", "t", "--split", "eval", "--device", "cpu", "--cps", "AB"]
    monkeypatch.setattr(test_script, "write_prediction", lambda *a: os.kill(os.getpid(), signal.SIGTERM))
    previous = signal.signal(signal.SIGTERM, lambda *a: pytest.fail("SIGTERM reached the test's handler"))
    try:
        assert cli_fails(capsys, test_script.main, argv, code=143) == "terminated"
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert [n for n in os.listdir(folder) if n.startswith(".tmp-")] == [] and not (folder / "predictions_AB").exists()


# ------------------------------------------------------------------------ 5. more of this kind

def test_validation_on_a_training_or_test_split_is_refused(tiny_data, capsys):
    (tiny_data / "data" / "splits" / "test.txt").write_text("0007\n0008\n")
    for flags, roles in ((["-se", "labeled_20p"], "a training split and the validation split"),
                         (["-se", "test"], "the validation split and the test split")):
        assert roles in fails(capsys, train, "v", "-ep", "0", *flags)
    assert not (tiny_data / "logs" / "v").exists()


def test_ramp_up_length_without_ramp_up_is_refused(tiny_data, capsys):
    err = fails(capsys, train, "c", "-ep", "0", "-cr", "40")
    assert "-cr/--consistency_rampup 40: has no effect without -r/--cps_rampup" in err
