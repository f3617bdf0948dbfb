"""The phantom benchmark's protocol and runner (scripts/benchmark.py, docs/benchmark/phantom_20p.md): the schedule
arithmetic, the order folds run in, and what counts as trained, tested and resumable."""
import importlib
import json
import os
import sys
import threading
import time

import numpy as np
import pytest

from conftest import REPO
from utils.io import write_list

sys.path.insert(0, os.path.join(REPO, "scripts"))


@pytest.fixture
def bench(tmp_path, monkeypatch):
    """scripts/benchmark.py imported against a phantom data folder with the real split sizes (13/2/11/3/4)."""
    splits = tmp_path / "data" / "splits"
    ids = [f"{i:04d}" for i in range(1, 21)]
    for name, part in (("train", ids[:13]), ("labeled_20p", ids[:2]), ("unlabeled_20p", ids[2:13]),
                       ("eval", ids[13:16]), ("test", ids[16:])):
        write_list(splits / f"{name}.txt", part)
    monkeypatch.setenv("DHC_PHANTOM_RAW", str(tmp_path / "raw"))  # set here so that teardown restores them
    monkeypatch.setenv("DHC_PHANTOM_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("DHC_LOG_ROOT", str(tmp_path / "logs"))
    monkeypatch.setenv("DHC_BENCHMARK_RUNS", str(tmp_path / "runs"))
    import benchmark
    return importlib.reload(benchmark)


@pytest.mark.parametrize("per_epoch, iterations", [(6, 1200), (6, 2400), (4, 6000), (1, 2400), (5, 2400), (3, 100)])
def test_schedule_validates_the_last_epoch_and_hits_the_budget(per_epoch, iterations):
    from config import BENCHMARK
    max_epoch, every = BENCHMARK.schedule(per_epoch, iterations)
    assert max_epoch % every == 0  # validation runs when epoch % every == 0: the last epoch is validated
    assert abs((max_epoch + 1) * per_epoch - iterations) <= every * per_epoch
    assert abs(max_epoch // every - BENCHMARK.n_evals) <= 3  # validations after epoch 0


def test_rows_get_their_iterations_per_epoch(bench):
    # 11 unlabeled cases in batches of 2: 6 iterations (ADSH drops the last incomplete batch: 5);
    # fully: 2 labeled cases in batches of 4 (1); fully_all: 13 training cases in batches of 4 (4)
    got = {m: bench.Fold(m, 0).per_epoch for m in ("dhc", "adsh", "fully", "fully_all")}
    assert got == {"dhc": 6, "adsh": 5, "fully": 1, "fully_all": 4}
    dhc, bound = bench.Fold("dhc", 0), bench.Fold("fully_all", 0)
    assert (dhc.max_epoch, dhc.eval_every, dhc.iterations) == (400, 20, 2406)
    assert (bound.max_epoch, bound.eval_every) == (1500, 75)
    cmd = bound.train_cmd()
    assert cmd.count("-sl") == 1 and cmd[cmd.index("-sl") + 1] == "train"
    assert dhc.train_cmd()[dhc.train_cmd().index("-sl") + 1] == "labeled_20p"
    assert "train_fully.py" in cmd[1] and cmd[cmd.index("-ep") + 1] == "1500"
    unetrpp = bench.Fold("dhc_unetrpp", 0).train_cmd()
    assert unetrpp[-3:] == ["32", "32", "32"] and unetrpp[unetrpp.index("--base_lr") + 1] == "0.001"
    assert cmd.count("--base_lr") == 1 and cmd[cmd.index("--base_lr") + 1] == "0.03"


def test_the_benchmark_has_its_own_phantom(monkeypatch):
    """Without overrides the runner and its children use config.BENCHMARK's folders under the repository (a
    finer grid than the demo's phantom), and its data step writes that grid."""
    for name in ("DHC_PHANTOM_RAW", "DHC_PHANTOM_DATA", "DHC_LOG_ROOT"):
        monkeypatch.setenv(name, "")  # registered, so that teardown restores what was there,
        monkeypatch.delenv(name)      # then unset for the import
    import benchmark
    bench = importlib.reload(benchmark)
    from config import BENCHMARK
    assert bench.ENV["DHC_PHANTOM_RAW"] == os.path.join(REPO, BENCHMARK.raw_dir)
    assert bench.ENV["DHC_PHANTOM_DATA"] == bench.PHANTOM.data_dir == os.path.join(REPO, BENCHMARK.data_dir)
    calls = []
    monkeypatch.setattr(bench.subprocess, "run", lambda cmd, **kw: calls.append((cmd, kw["env"])))
    bench.ensure_data()
    assert calls[0][0][-4:] == ["--shape", *map(str, BENCHMARK.raw_shape)]
    assert all(env["DHC_PHANTOM_DATA"] == bench.ENV["DHC_PHANTOM_DATA"] for _, env in calls)


def test_plan_runs_first_seeds_then_the_key_rows(bench):
    folds = bench.plan(["dhc", "fully_all", "cps", "fully", "uamt"], [0, 1, 666])
    order = [(f.method, f.seed) for f in folds]
    assert order[:5] == [("dhc", 0), ("fully_all", 0), ("cps", 0), ("fully", 0), ("uamt", 0)]
    assert order[5:] == [(m, s) for m in ("dhc", "fully_all", "cps", "fully") for s in (1, 666)] + \
        [("uamt", 1), ("uamt", 666)]
    assert [f.fold for f in folds if f.method == "uamt"] == [1, 2, 3]  # fold numbers follow the seed list


def test_fold_states_and_resume(bench):
    fold = bench.Fold("cps", 1)
    assert not fold.trained() and not fold.tested() and "--resume" not in fold.train_cmd()
    ckpts = os.path.join(fold.folder, "ckpts")
    os.makedirs(ckpts)
    open(os.path.join(ckpts, "last.pth"), "w").close()
    assert fold.train_cmd()[-1] == "--resume"  # interrupted: continue it
    log = os.path.join(fold.folder, "train.log")
    with open(log, "w") as f:
        f.write("[10:00:00.000] epoch 0 | lr 0.03 | loss 1\n[10:00:12.000] epoch 1 | lr 0.03 | loss 1\n"
                "[10:00:24.000] epoch 2 | lr 0.03 | loss 1\n[11:30:00.000] epoch 3 | lr 0.03 | loss 1\n")
    assert fold.epochs_done() == 4
    assert bench.seconds_per_iteration(fold) == pytest.approx(12 / 6)  # the 90-minute gap (a restart) is skipped
    open(os.path.join(ckpts, "best_model.pth"), "w").close()
    assert not fold.trained()  # no "done" line yet: killed after a checkpoint
    with open(log, "a") as f:
        f.write("[11:30:05.000] done: best mean dice 0.5 at epoch 3; checkpoint x\n")
    assert fold.trained() and not fold.tested()
    preds = os.path.join(fold.folder, "predictions_AB")
    os.makedirs(preds)
    for i in range(3):
        open(os.path.join(preds, f"{i}.nii.gz"), "w").close()
    assert not fold.tested()  # 3 of the 4 test cases
    open(os.path.join(preds, "3.nii.gz"), "w").close()
    assert fold.tested() and not fold.done()  # done once recorded
    lines = bench.status([fold, bench.Fold("dhc", 0)], jobs=2)
    assert "2.00 s/it" in lines[0] and "to be recorded" in lines[0] and lines[-1].startswith("0 of 2 folds done")
    os.makedirs(os.path.dirname(fold.record))
    from benchmark_report import RECORD_VERSION, protocol
    with open(fold.record, "w") as f:
        json.dump({"version": RECORD_VERSION, "method": "cps", "seed": 1, "protocol": protocol(), "test": {},
                   "seconds_per_iteration": 2.5}, f)
    lines = bench.status([fold, bench.Fold("dhc", 0)], jobs=2)
    assert "done" in lines[0] and "2.50 s/it" in lines[0] and "left (2406 of 2406" in lines[1]
    assert lines[-1].startswith("1 of 2 folds done")


def test_a_fold_locked_by_another_process_is_left_alone(bench):
    from utils.io import FolderLock
    fold = bench.Fold("dhc", 0)
    os.makedirs(fold.folder)
    with FolderLock(fold.folder):
        assert fold.busy()
        assert bench.run_fold(fold, log=lambda s: None, wait=False) == "running in another process; left to it"
    assert not fold.busy()


def test_pauses_are_not_counted_as_training_time(bench):
    """A process stopped for a test suite (260 s between two 10-s epochs) or restarted hours later is not training;
    a validation epoch twice as long as the others is."""
    assert bench.working_gaps([10, 10, 12, 10, 260, 10]) == [10, 10, 12, 10, 10]
    assert bench.working_gaps([5, 1, 5, 1, 5, 20, 59]) == [5, 1, 5, 1, 5, 20, 59]  # limit: 60 s at least
    assert bench.working_gaps([30, 30, 30, 400, 290]) == [30, 30, 30, 290]  # limit: 10 x the median (30 -> 300 s)
    assert bench.working_gaps([]) == []


def test_a_failing_fold_is_reported_when_it_fails(bench, monkeypatch):
    """A fold whose training exits non-zero is named in the runner's log at once (the other lane goes on), with
    the exit status and its log file, and nothing is tested."""
    fold, logged, calls = bench.Fold("dhc", 0), [], []
    monkeypatch.setattr(bench.subprocess, "call", lambda cmd, **kw: calls.append(cmd) or 3)
    error = bench.run_fold(fold, log=logged.append)
    assert error == f"train exited with 3 (see {os.path.join(fold.folder, 'benchmark.log')})"
    assert len(calls) == 1 and "train_dhc.py" in calls[0][1]
    assert logged[-1].endswith(f"failed: dhc seed 0: {error}") and not any("done" in line for line in logged)


def test_lanes_log_whole_lines(bench):
    """Two lanes logging at once never run their lines together: each line reaches the stream in one write."""

    class Recorder:
        def __init__(self):
            self.writes = []

        def write(self, text):
            self.writes.append(text)
            time.sleep(0.0005)  # widen the window in which another lane could write

        def flush(self):
            pass

    stream = Recorder()
    log = bench.line_printer(stream)
    lanes = [threading.Thread(target=lambda k=k: [log(f"lane {k} line {i}") for i in range(40)]) for k in range(2)]
    for lane in lanes:
        lane.start()
    for lane in lanes:
        lane.join()
    assert sorted(stream.writes) == sorted(f"lane {k} line {i}\n" for k in range(2) for i in range(40))


def test_unknown_method_is_one_error_line(bench, capsys):
    assert bench.main(["--methods", "nope", "--status"]) == 2
    assert capsys.readouterr().err.startswith("error: --methods: unknown nope")


def test_report_curves_average_seeds_and_measure_the_last_quarter(bench):
    """The page's plateau column: validation Dice (x100) at iteration (epoch + 1) * per_epoch, averaged over seeds
    up to the shortest curve, and its range over the last quarter of the iterations."""
    import benchmark_report
    folds = [bench.Fold("dhc", 0), bench.Fold("dhc", 1)]  # 6 iterations per epoch
    curves = {0: [(0, 0.10), (10, 0.50), (20, 0.70), (30, 0.72), (40, 0.74)],
              1: [(0, 0.20), (10, 0.60), (20, 0.60), (30, 0.76)]}
    for fold in folds:
        os.makedirs(fold.folder)
        with open(os.path.join(fold.folder, "train.log"), "w") as log:
            log.write("[05:00:00.000] dhc on phantom\n")
            for epoch, dice in curves[fold.seed]:
                log.write(f"[05:00:01.000] validation epoch {epoch}: mean dice {dice:.4f} (best ...) | spleen 0.1\n")
    it, dice = benchmark_report.validation_curve(folds[0])
    assert it.tolist() == [6, 66, 126, 186, 246] and dice[-1] == pytest.approx(74.0)
    it, dice, n = benchmark_report.mean_curve([benchmark_report.validation_curve(f) for f in folds])
    assert n == 2 and it.tolist() == [6, 66, 126, 186]
    assert dice == pytest.approx([15.0, 55.0, 65.0, 74.0])
    # last quarter: iterations >= 0.75 * 186 = 139.5, i.e. 186 only
    assert benchmark_report.last_quarter(it, dice) == pytest.approx((74.0, 74.0))
    assert benchmark_report.last_quarter(np.array([100, 750, 800, 1000]), np.array([1, 2, 5, 3.0])) == (2.0, 5.0)
    assert benchmark_report.mean_curve([benchmark_report.validation_curve(bench.Fold("cps", 0))]) is None


def test_report_ranks_rows_by_mean_dice(bench):
    """The page lists rows best first by the mean over the organs of the per-organ Dice (seed means); ties keep
    the runner's order."""
    import benchmark_report
    results = {"fully": (np.array([10.0, 30.0]), None), "dhc": (np.array([80.0, 40.0]), None),
               "cps": (np.array([50.0, 10.0]), None), "acisis": (np.array([0.0, 60.0]), None)}
    assert benchmark_report.ranking(results) == ["dhc", "cps", "acisis", "fully"]


def test_report_counts_the_iterations_a_run_trained(bench):
    """The original's early stop can end a run before its plan: the page reports (last epoch + 1) x per-epoch
    iterations from train.log, marked when the log says it stopped early."""
    import benchmark_report
    folds = [bench.Fold("dhc", 0), bench.Fold("dhc", 1)]  # 6 iterations per epoch, 2406 planned
    logs = {0: ["[05:00:00.000] epoch 0 | lr 0.03 | loss 1.0", "[05:00:01.000] epoch 319 | lr 0.01 | loss 0.5",
                "[05:00:01.500] validation epoch 320: mean dice 0.7 (best 0.8 at epoch 220) | spleen 0.8",
                "[05:00:02.000] epoch 320 | lr 0.01 | loss 0.5",
                "[05:00:02.000] early stop: no improvement for 100 epochs"],
            1: ["[05:00:00.000] epoch 400 | lr 0.0001 | loss 0.2"]}
    for fold in folds:
        os.makedirs(fold.folder)
        with open(os.path.join(fold.folder, "train.log"), "w") as log:
            log.write("\n".join(logs[fold.seed]) + "\n")
    assert benchmark_report.trained_iterations(folds[0]) == (321 * 6, True)
    assert benchmark_report.trained_iterations(folds[1]) == (401 * 6, False)
    assert benchmark_report.trained_iterations(bench.Fold("cps", 0)) == (0, False)
    records = [{"iterations": dict(zip(("trained", "early_stop"), benchmark_report.trained_iterations(f)),
                                   planned=f.iterations)} for f in folds]
    assert benchmark_report.iterations_cell(records) == "1926 (early stop), 2406 of 2406"


def test_report_says_where_the_voxels_go(bench, tmp_path):
    """The page's over-/under-segmentation table: confusion of the test predictions against the evaluation's ground
    truth (the preprocessed label through the training pipeline, here halved in-plane), then hand-computed ratios."""
    import SimpleITK as sitk
    import benchmark_report
    from data.transforms import halve_inplane_label
    fold = bench.Fold("dhc", 0)
    os.makedirs(os.path.join(fold.folder, "predictions_AB"))
    os.makedirs(tmp_path / "data" / "npy")
    expected = np.zeros((14, 14), np.int64)
    for k, case in enumerate(["0017", "0018", "0019", "0020"]):
        label = np.zeros((4, 8, 8), np.uint8)
        label[:, :4] = 6  # liver in the top half
        label[0, 4:, :2] = 1 + k  # one small organ per case
        np.save(tmp_path / "data" / "npy" / f"{case}_label.npy", label)
        gt = halve_inplane_label(label)
        pred = gt.copy()
        pred[:, 2] = 6  # liver one row too far into the background
        sitk.WriteImage(sitk.GetImageFromArray(pred), os.path.join(fold.folder, "predictions_AB", f"{case}.nii.gz"))
        expected += benchmark_report.confusion(gt, pred, 14)
    assert gt.shape == (4, 4, 4)
    labels = benchmark_report.load_test_labels()
    assert sorted(labels) == ["0017", "0018", "0019", "0020"] and (labels["0020"] == gt).all()
    stats, conf = benchmark_report.test_statistics(fold, labels)
    from evaluate_Ntimes import collect_stats
    from utils.task import get_task
    reference = collect_stats(get_task("phantom"), "Task_phantom_20p/dhc", 1, "AB", progress=False)[0][0]
    assert stats.shape == (4, 13, 5) and np.array_equal(stats, reference, equal_nan=True)  # as evaluate_Ntimes.py
    assert (conf == expected).all() and conf.sum() == 4 * 64 and conf[6, 6] == 4 * 32 and conf[0, 6] == 4 * 16 - 4
    ratio, precision, recall, on_background, _, _ = benchmark_report.voxel_summary(conf, 6)
    # 128 liver voxels, 64 more predicted (60 background, 4 small-organ voxels), 4 small-organ voxels kept
    assert (ratio, precision, recall) == pytest.approx((192 / 128, 100 * 128 / 192, 100.0))
    assert on_background == pytest.approx(100 * 60 / 196)

    conf = np.array([[80, 10, 0, 0],
                     [5, 15, 0, 0],
                     [2, 0, 8, 0],
                     [4, 0, 0, 0]])  # class 3 is never predicted: no precision, recall 0
    assert benchmark_report.voxel_summary(conf, 1) == pytest.approx(
        (25 / 20, 60.0, 75.0, 100 * 10 / 33, 80.0, (75 + 80 + 0) / 3))


def _finished_fold(bench, tmp_path, method, seed, rng):
    """A fold as the runner leaves it when trained and tested: its logs, a checkpoint and four test predictions
    (the ground truth with a fifth of the voxels relabelled at random), over a phantom with every organ."""
    import SimpleITK as sitk
    from data.transforms import halve_inplane_label
    npy = tmp_path / "data" / "npy"
    if not npy.is_dir():
        os.makedirs(npy)
        for i in range(1, 21):
            np.save(npy / f"{i:04d}_label.npy", rng.integers(0, 14, (4, 16, 16)).astype(np.uint8))
    fold = bench.Fold(method, seed)
    os.makedirs(os.path.join(fold.folder, "ckpts"))
    open(os.path.join(fold.folder, "ckpts", "best_model.pth"), "w").close()
    with open(os.path.join(fold.folder, "train.log"), "w") as log:
        for epoch in range(4):
            log.write(f"[05:00:{10 * epoch:02d}.000] epoch {epoch} | lr 0.03 | loss 1\n")
            dice = 0.1 * epoch + seed / 1000
            log.write(f"[05:00:{10 * epoch + 5:02d}.000] validation epoch {epoch}: mean dice {dice:.4f} (best ...)\n")
        log.write("[05:00:40.000] done: best mean dice 0.3 at epoch 3; checkpoint x\n")
    with open(os.path.join(fold.folder, "benchmark.log"), "w") as log:
        log.write(f"\n# 2026-12-07 05:00:00 commit abc1234\n# {' '.join(fold.train_cmd())}\n")
    os.makedirs(os.path.join(fold.folder, "predictions_AB"))
    for case in ["0017", "0018", "0019", "0020"]:
        pred = halve_inplane_label(np.load(npy / f"{case}_label.npy"))
        noise = rng.random(pred.shape) < 0.2
        pred[noise] = rng.integers(0, 14, int(noise.sum()))
        sitk.WriteImage(sitk.GetImageFromArray(pred), os.path.join(fold.folder, "predictions_AB", f"{case}.nii.gz"))
    return fold


def test_runs_are_recorded_and_the_page_is_written_from_records_alone(bench, tmp_path, monkeypatch, capsys):
    """A finished fold becomes a run record; once recorded it is done on any machine (its logs, checkpoints and
    predictions gone, as on a fresh checkout) and is not trained again, and the page's table equals
    evaluate_Ntimes.py over the fold folders while they existed."""
    import shutil
    import benchmark_report
    from evaluate_Ntimes import evaluate
    from utils.task import get_task
    rng = np.random.default_rng(0)
    folds = [_finished_fold(bench, tmp_path, "dhc", seed, rng) for seed in (0, 1)]
    expected = evaluate(get_task("phantom"), "Task_phantom_20p/dhc", 2, "AB", progress=False)["json"]["paper"]
    bench.record_finished(folds + [bench.Fold("cps", 0)], log=lambda s: None)  # cps: not run, not recorded
    assert [f.done() for f in folds] == [True, True] and not bench.Fold("cps", 0).done()
    rec = json.load(open(folds[1].record))
    assert rec["method"] == "dhc" and rec["seed"] == 1 and rec["commits"] == ["abc1234"]
    assert rec["commands"][0].startswith("python code/train_dhc.py --task phantom --exp Task_phantom_20p/dhc/fold2 ")
    assert rec["iterations"] == {"per_epoch": 6, "planned": 2406, "trained": 24, "early_stop": False}
    assert rec["validation"] == [[6, 0.1], [12, 10.1], [18, 20.1], [24, 30.1]]
    assert rec["seconds_per_iteration"] == pytest.approx(10 / 6) and rec["wall_seconds"] == 40

    shutil.rmtree(tmp_path / "logs")  # a fresh machine: only the records are left
    monkeypatch.setattr(bench.subprocess, "call", lambda *a, **k: pytest.fail("a recorded fold was run again"))
    assert bench.run_fold(folds[0], log=lambda s: None) is None
    assert "done" in bench.status(folds, jobs=2)[0]
    out = tmp_path / "page"
    benchmark_report.write_report(["dhc", "cps"], folds + [bench.Fold("cps", 0)], str(out), str(tmp_path / "runs"))
    row = next(line for line in open(out / "phantom_20p.csv") if line.startswith("dhc,"))
    cells = [float(v) for v in row.split(",")[1:]]
    assert cells[0] == 2 and cells[1:-4:2] == pytest.approx(expected["dice"]["class_mean"])
    assert cells[2:-4:2] == pytest.approx(expected["dice"]["class_std"])
    assert cells[-4:] == pytest.approx([expected["dice"]["mean"], expected["dice"]["std"],
                                        expected["asd"]["mean"], expected["asd"]["std"]])
    page = open(out / "phantom_20p.md").read()
    assert "| dhc | 0, 1 |" in page and "24, 24 of 2406 | 1.67 | 40 |" in page and "`abc1234`" in page
    assert "Not yet recorded: cps seed 0." in page
    assert f"Timing measured on {rec['machine']['cpu']}, {os.cpu_count()} cores, torch " in page


def test_bad_run_records(bench, tmp_path, capsys):
    """A record made under another protocol is left out with a line naming it and what differs; an unreadable one
    is an error naming the file; a record that cannot be made (a prediction missing) leaves no file behind."""
    import benchmark_report
    from utils.io import DataError
    rng = np.random.default_rng(1)
    fold = _finished_fold(bench, tmp_path, "cps", 0, rng)
    benchmark_report.write_record(fold)
    other = json.load(open(fold.record))
    other["seed"], other["protocol"]["n_filters"] = 1, 8
    with open(str(tmp_path / "runs" / "cps_seed1.json"), "w") as f:
        json.dump(other, f)
    records = benchmark_report.load_records(str(tmp_path / "runs"))
    assert [r["seed"] for r in records["cps"]] == [0]
    assert bench.Fold("cps", 0).done() and not bench.Fold("cps", 1).done()  # the other protocol's fold runs again
    assert f"left out {tmp_path / 'runs' / 'cps_seed1.json'}: recorded under another protocol (n_filters differ)" \
        in capsys.readouterr().out
    with open(str(tmp_path / "runs" / "cps_seed1.json"), "w") as f:
        f.write('{"version": 1, "method": "cps", "se')  # cut short
    with pytest.raises(DataError, match="cps_seed1.json: unreadable run record"):
        benchmark_report.load_records(str(tmp_path / "runs"))

    fold = _finished_fold(bench, tmp_path, "dhc", 0, rng)
    os.remove(os.path.join(fold.folder, "predictions_AB", "0020.nii.gz"))
    with pytest.raises(Exception, match="0020.nii.gz"):
        benchmark_report.write_record(fold)
    assert sorted(os.listdir(tmp_path / "runs")) == ["cps_seed0.json", "cps_seed1.json"]
