"""Training and inference under torchrun (DistributedDataParallel, gloo on CPU): the engine's DDP path, the
reduction helpers, and every method under 2 processes. Each run is a real ``torchrun`` subprocess of 1 thread per
rank on the tiny data (2 labeled + 4 unlabeled cases, batch 2 + 2: one iteration per rank and epoch)."""
import os
import subprocess
import sys

import pytest
import torch

from conftest import FAST, METHODS, REPO
from test_methods_common import EXTRA_FLAGS

PY = sys.executable
EXTRA = EXTRA_FLAGS  # per-method flags the tiny data needs (adsh's bank, UNETR++'s patch)


def _env(tiny, **extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=os.path.join(REPO, "code"))
    env.update(DHC_PHANTOM_DATA=str(tiny / "data"), DHC_LOG_ROOT=str(tiny / "logs"), **extra)
    return env


def torchrun(tiny, nproc, script, args, dump=None, check=True, **env):
    """``python -m torch.distributed.run --standalone --nproc_per_node nproc code/<script> args``."""
    cmd = [PY, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           os.path.join(REPO, "code", script), *args]
    env = _env(tiny, **({"DHC_DDP_DUMP": str(dump)} if dump else {}), **env)
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def plain(tiny, script, args, dump=None):
    env = _env(tiny, **({"DHC_DDP_DUMP": str(dump)} if dump else {}))
    proc = subprocess.run([PY, os.path.join(REPO, "code", script), *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def train_args(method, exp, epochs=1, *extra):
    return [*FAST, "--exp", exp, "-ep", str(epochs), *EXTRA.get(method, []), *extra]


def load(path):
    return torch.load(path, map_location="cpu", weights_only=False)


def flat(obj, prefix=""):
    """{dotted key: tensor} of nested dicts/lists of tensors (other leaves ignored)."""
    out = {}
    if torch.is_tensor(obj):
        out[prefix] = obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            out.update(flat(v, f"{prefix}.{k}"))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            out.update(flat(v, f"{prefix}.{i}"))
    return out


def assert_same(a, b, what):
    fa, fb = flat(a), flat(b)
    assert fa.keys() == fb.keys(), what
    for key in fa:
        assert torch.equal(fa[key], fb[key]), f"{what}: {key} differs"


# ----------------------------------------------------------------------------------------------- engine under torchrun


def test_one_process_torchrun_is_the_plain_run(tiny_data):
    """torchrun --nproc_per_node 1 keeps the plain run's random stream: bit-identical nets and method state."""
    plain(tiny_data, "train_dhc.py", train_args("dhc", "plain", 1))
    torchrun(tiny_data, 1, "train_dhc.py", train_args("dhc", "tr1", 1))
    a, b = (load(tiny_data / "logs" / e / "ckpts" / "last.pth") for e in ("plain", "tr1"))
    assert_same(a["nets"], b["nets"], "nets")
    assert_same(a["method"], b["method"], "method state")
    assert flat(a["nets"])  # something was compared


def test_two_ranks_dhc_identical_and_resumable(tiny_data):
    """2 ranks, 2 epochs: the ranks end with identical nets and class weights; a run stopped after epoch 0 and
    resumed equals the uninterrupted one; best_model.pth has the original's {A, B} layout and test.py reads it."""
    dump = tiny_data / "dump"
    proc = torchrun(tiny_data, 2, "train_dhc.py", train_args("dhc", "ddp", 1), dump=dump)
    r0, r1 = load(dump / "rank0.pth"), load(dump / "rank1.pth")
    assert_same(r0, r1, "rank 0 vs rank 1")
    run = __import__("json").loads((tiny_data / "logs" / "ddp" / "run.json").read_text())
    assert run["world_size"] == 2 and run["global_batch"] == {"labeled": 4, "unlabeled": 4}
    best = load(tiny_data / "logs" / "ddp" / "ckpts" / "best_model.pth")
    assert sorted(best) == ["A", "B"] and not any(k.startswith("module.") for k in best["A"])
    # the same run in two goes: stopped after epoch 0, then --resume for epoch 1
    torchrun(tiny_data, 2, "train_dhc.py", train_args("dhc", "two_goes", 1), DHC_STOP_AFTER_EPOCH="0")
    torchrun(tiny_data, 2, "train_dhc.py", train_args("dhc", "two_goes", 1, "--resume"))
    a, b = (load(tiny_data / "logs" / e / "ckpts" / "last.pth") for e in ("ddp", "two_goes"))
    assert_same(a["nets"], b["nets"], "resumed nets")
    assert_same(a["method"], b["method"], "resumed method state")
    assert "train.log" not in os.listdir(tiny_data / "logs" / "ddp" / "ckpts")
    assert proc.stdout.count("validation epoch 0") == 1  # rank 0 alone validates and logs


def test_statistics_over_two_ranks_equal_one_process(tmp_path):
    """DistDW counts, DiffDW Dice, DePL q̂, CLD and ACISIS confidences, ADSH banks and thresholds: each rank sees half
    of each global batch and ends with the state one process computes from the whole batches (2 gloo ranks)."""
    worker = os.path.join(REPO, "tests", "ddp_reduce_worker.py")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for nproc, out in ((2, tmp_path / "two"), (None, tmp_path / "one")):
        out.mkdir()
        cmd = ([PY, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc else [PY])
        proc = subprocess.run([*cmd, worker, str(out)], env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-4000:]
    r0, r1, one = (load(p) for p in (tmp_path / "two" / "rank0.pt", tmp_path / "two" / "rank1.pt",
                                      tmp_path / "one" / "rank0.pt"))
    assert_same(r0, r1, "rank 0 vs rank 1")
    f0, f1 = flat(r0), flat(one)
    assert f0.keys() == f1.keys() and len(f0) >= 15
    exact = ("distdw", "diffdw", "adsh")  # integer counts (exact in fp32) or a bank of the same rows
    for key in f0:
        if key.lstrip(".").startswith(exact):
            assert torch.equal(f0[key], f1[key]), key
        else:  # sums in another order: float rounding only
            torch.testing.assert_close(f0[key], f1[key], rtol=1e-5, atol=1e-7, msg=key)
    assert not torch.equal(one["distdw"], torch.ones(4))  # the weights moved


def test_sharded_test_py_writes_the_single_process_predictions(tiny_data):
    """torchrun --nproc_per_node 2 code/test.py: the cases are split over the ranks; the prediction set equals the
    one process writes (same files, same voxels) and no staging folder is left."""
    import SimpleITK as sitk
    torchrun(tiny_data, 2, "train_dhc.py", train_args("dhc", "run", 0))
    flags = ["--task", "phantom", "--exp", "run", "--split", "eval", "--device", "cpu", "--cps", "AB"]
    plain(tiny_data, "test.py", flags)
    exp = tiny_data / "logs" / "run"
    os.rename(exp / "predictions_AB", exp / "single")
    torchrun(tiny_data, 2, "test.py", flags)
    names = sorted(os.listdir(exp / "single"))
    assert names == sorted(os.listdir(exp / "predictions_AB")) == ["0007.nii.gz", "0008.nii.gz"]
    for name in names:
        a, b = (sitk.GetArrayFromImage(sitk.ReadImage(str(exp / d / name))) for d in ("single", "predictions_AB"))
        assert a.shape == (24, 32, 32) and (a == b).all()
    assert not [n for n in os.listdir(exp) if n.startswith(".tmp-")]


def test_every_method_trains_under_two_ranks(tiny_data):
    """One epoch of every method under 2 gloo processes (one torchrun launch for all of them): no error, and both
    ranks end with identical nets (parameters and BatchNorm statistics), teachers and method state."""
    dump = tiny_data / "dump"
    worker = os.path.join(REPO, "tests", "ddp_methods_worker.py")
    proc = subprocess.run([PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", worker,
                           str(dump), *METHODS], cwd=REPO, env=_env(tiny_data), capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-5000:]
    failed = {m: (dump / m / "error0").read_text()[-1500:] for m in METHODS if (dump / m / "error0").exists()}
    assert not failed, failed
    for m in METHODS:
        r0, r1 = load(dump / m / "rank0.pth"), load(dump / m / "rank1.pth")
        assert_same(r0, r1, f"{m}: rank 0 vs rank 1")
        assert flat(r0["nets"]), m


@pytest.mark.parametrize("gpus, launch", [("0", "code/train_dhc.py"),
                                          ("0,1,2", "-m torch.distributed.run --standalone --nproc_per_node 3 "
                                                    "code/train_dhc.py")])
def test_train3times_launches_torchrun_for_a_gpu_list(tmp_path, gpus, launch):
    """-c 0: the plain single-process command with -g 0; -c 0,1,2: torchrun with 3 processes on those GPUs, for
    training and testing (a stand-in python records the commands)."""
    stub = tmp_path / "py"
    stub.write_text('#!/bin/sh\necho "CVD=${CUDA_VISIBLE_DEVICES:-unset} $*" >> "$LOG"\n')
    stub.chmod(0o755)
    env = dict(os.environ, PYTHON=str(stub), LOG=str(tmp_path / "log"), SEEDS="0")
    proc = subprocess.run(["bash", "scripts/train3times.sh", "20", "-c", gpus, "-t", "phantom", "-m", "dhc"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    train, test, evaluate = (tmp_path / "log").read_text().splitlines()
    cvd = "unset" if gpus == "0" else gpus
    assert train.startswith(f"CVD={cvd} {launch} --task phantom --exp Task_phantom_20p/dhc/fold1 --seed 0")
    assert ("-g 0" in train) == (gpus == "0") and ("-g 0" in test) == (gpus == "0")
    assert test.startswith(f"CVD={cvd} {launch.replace('train_dhc', 'test')}")
    assert evaluate.startswith(f"CVD={cvd} code/evaluate_Ntimes.py")
    bad = subprocess.run(["bash", "scripts/train3times.sh", "20", "-c", "0;1", "-m", "dhc"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and bad.stderr.startswith("error: -c 0;1")


def test_gpu_check_dry_run_prints_its_table(tmp_path):
    """bench/gpu_check.sh --dry-run (CPU, tiny sizes, DHC only): every step runs and lands in the one table; a bad
    option is one error line."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHON=PY)
    proc = subprocess.run(["bash", "bench/gpu_check.sh", "--dry-run", "--methods", "dhc"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = proc.stdout[proc.stdout.index("| check"):].splitlines()
    assert [row.split(" | ")[0] for row in table[2:]] == [
        "| train dhc (fp32)", "| DHC step fp32 / AMP", "| inference 24x64x64 A+B",
        "| torchrun --nproc_per_node 1 train_dhc"]
    assert " it/s | " in table[2] and "| ok |" in table[-1] and "failed" not in proc.stdout
    bad = subprocess.run(["bash", "bench/gpu_check.sh", "--iters", "0"], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode == 2 and bad.stderr.startswith("error: --iters 0")


def test_sync_bn_needs_cuda_ranks(tiny_data, capsys):
    """--sync_bn without torchrun on CUDA devices is one error line (SyncBatchNorm needs NCCL ranks)."""
    import engine
    from train_dhc import DHC
    with pytest.raises(SystemExit) as stop:
        engine.run(DHC, [*FAST, "--exp", "x", "-ep", "0", "--sync_bn"])
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(err) == 1 and err[0].startswith("error: --sync_bn needs torchrun")
