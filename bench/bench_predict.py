"""predict.py on one scan: the sliding window vs bringing the class scores back to the scan's grid; and, on a
trained phantom run, how trilinear probabilities compare with nearest-neighbour labels and what --tta changes.

Timing (default): one Synapse-sized scan (148x512x512 raw HU), the Synapse pipeline (in-plane halving to
148x256x256, patch 64x128x128, --speed 0: 175 windows), two 8-filter VNets, on the CPU by default. Checked first:
the labels on the scan's grid equal the inference grid's argmax wherever a grid voxel sits (every second voxel
in-plane). Then the median seconds of each stage of ``predict.segment`` side by side:

    python bench/bench_predict.py [--shape 148 512 512] [--n_filters 8] [--reps 1] [--device cpu]

Accuracy (``--phantom_exp RUN``, a trained phantom run, e.g. Task_phantom_20p/dhc/fold1 after ``make demo``): on the
phantom's test cases (raw scans and labels of ``Datasets/Phantom``), per-organ Dice against the raw labels of
(a) predict.py's trilinear probabilities, argmax on the scan's grid; (b) the inference grid's labels resampled
nearest-neighbour (each scan voxel takes the label of the nearest grid voxel, grid voxel i sitting on scan voxel
i*N/G as in test.py's header: ITK's nearest onto the scan); (c) F.interpolate's nearest resize (floor(j*G/N));
(d) (a) with --tta (the default axes H, W and all three); (e) trilinear with grid voxel i at the centre of the scan voxels it averages (F.interpolate's
align_corners=False: the image's placement rather than the labels').

    python bench/bench_predict.py --phantom_exp Task_phantom_20p/dhc/fold1 [--cps AB]
"""
import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "code"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
import SimpleITK as sitk  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import bench_inference  # noqa: E402
import predict  # noqa: E402
from data.transforms import resize_label  # noqa: E402
from utils.checkpoint import RunNets, load_run_nets  # noqa: E402
from utils.inference import (ALL_MIRRORS, STRIDES, TRAINED_MIRRORS, prepare_net, prepare_scan, resample_to_scan,  # noqa: E402
                             sliding_window_scores)
from utils.io import read_list  # noqa: E402
from utils.metrics import dice  # noqa: E402
from utils.task import get_task  # noqa: E402


def make_nets(device, n_filters, num_classes):
    """bench_inference's two VNets with non-trivial BatchNorm statistics, prepared for inference."""
    return [prepare_net(net, device) for net in bench_inference.make_nets("cpu", n_filters, num_classes)]


def synthetic_scan(shape, seed=0):
    """Raw-HU int16 volume: soft tissue with a few bright and dark blocks (so the nets' outputs vary)."""
    rng = np.random.default_rng(seed)
    image = rng.normal(40, 20, shape).astype(np.float32)
    d, h, w = shape
    for k in range(6):
        z, y, x = rng.integers(0, d // 2), rng.integers(0, h // 2), rng.integers(0, w // 2)
        image[z:z + d // 3, y:y + h // 4, x:x + w // 4] = rng.uniform(-200, 300)
    return image.astype(np.int16)


def stages(args, device):
    """{stage: [seconds per rep]} of predict.segment's pieces on one synthetic scan, after a correctness check."""
    task = get_task("synapse")
    nets = make_nets(device, args.n_filters, task.num_cls)
    run_nets = RunNets(nets=nets, spec={"name": "VNet", "patch_size": tuple(task.patch_size)}, layout=["A", "B"],
                       keys=["A", "B"], path="synthetic")
    raw = synthetic_scan(tuple(args.shape))
    grid = prepare_scan(raw, task)
    patch, (sxy, sz) = run_nets.patch_size, STRIDES[0]
    print(f"device {device} ({torch.get_num_threads()} threads), scan {tuple(raw.shape)} -> inference grid "
          f"{tuple(grid.shape)}, patch {patch}, strides xy {sxy} z {sz}, 2 VNets n_filters {args.n_filters}")
    times = {k: [] for k in ("prepare (clip, min-max, halve)", "sliding window",
                             "back to the scan's grid (labels)", "... with float16 probabilities",
                             "nearest labels instead (argmax on the grid + nearest resize)", "write .nii.gz")}
    with tempfile.TemporaryDirectory() as tmp:
        scan_path = os.path.join(tmp, "scan.nii.gz")
        sitk.WriteImage(sitk.GetImageFromArray(raw), scan_path)
        image = sitk.ReadImage(scan_path)
        for rep in range(args.reps):
            t = [time.perf_counter()]
            grid = prepare_scan(raw, task)
            t.append(time.perf_counter())
            prob = sliding_window_scores(nets, grid, patch, sxy, sz, task.num_cls, 4, device, False)
            sync(device, t)
            labels, _ = resample_to_scan(prob, raw.shape)
            sync(device, t)
            _, probs = resample_to_scan(prob, raw.shape, keep_probabilities=True)
            sync(device, t)
            nearest = resize_label(prob.argmax(0).to(torch.uint8).cpu().numpy(), raw.shape)
            t.append(time.perf_counter())
            predict.write_labels(os.path.join(tmp, "labels.nii.gz"), labels, scan_path, image)
            t.append(time.perf_counter())
            if rep == 0:  # checked before any time is reported
                grid_labels = prob.argmax(0).cpu().numpy()
                assert np.array_equal(labels[:, ::2, ::2], grid_labels), "scan-grid labels != grid labels"
                assert probs.shape == (task.num_cls,) + raw.shape and nearest.shape == raw.shape
                print(f"checked: labels on the scan's grid = the grid's argmax at its voxels; "
                      f"{len(np.unique(grid_labels))} classes predicted; trilinear and nearest labels agree on "
                      f"{np.mean(labels == nearest) * 100:.2f} % of the scan")
            for key, a, b in zip(times, t, t[1:]):
                times[key].append(b - a)
            del prob, probs
    return times


def sync(device, marks):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    marks.append(time.perf_counter())


def print_times(times):
    window = statistics.median(times["sliding window"])
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:62s} median {med:8.2f} s  ({med / window * 100:6.1f} % of the sliding window)")


# ------------------------------------------------------------------------------------------------ accuracy
def nearest_labels(grid_labels, shape, rule):
    """Grid labels on the scan's grid: 'round' = the nearest grid voxel (floor(j*G/N + 0.5), clamped), 'floor' =
    F.interpolate's nearest (floor(j*G/N))."""
    if rule == "floor":
        return resize_label(grid_labels, shape)
    index = [np.minimum(np.floor(np.arange(n) * g / n + 0.5).astype(int), g - 1)
             for n, g in zip(shape, grid_labels.shape)]
    return grid_labels[np.ix_(*index)]


def organ_dice(labels, gt, num_cls):
    """Dice x100 per organ (NaN where the raw labels lack it)."""
    return np.array([100 * dice(labels == c, gt == c) if (gt == c).any() else np.nan for c in range(1, num_cls)])


def accuracy(args, device):
    task = get_task("phantom")
    run_nets = load_run_nets(task, args.phantom_exp, args.cps, device)
    sxy, sz = STRIDES[0]
    rows = []
    for case_id in read_list(task.split_path("test")):
        raw, image = predict.read_scan(os.path.join(task.raw_dir, "imagesTr", f"img{case_id}.nii.gz"))
        gt = sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(task.raw_dir, "labelsTr", f"label{case_id}.nii.gz")))
        grid = prepare_scan(raw, task)
        row = {}
        for tta, axes in ((False, ()), (True, TRAINED_MIRRORS), (True, ALL_MIRRORS)):
            prob = sliding_window_scores(run_nets.nets, grid, run_nets.patch_size, sxy, sz, task.num_cls, 4, device,
                                         False, axes)
            name = "trilinear" + (f" + tta {''.join('DHW'[a] for a in axes)}" if tta else "")
            row[name] = organ_dice(resample_to_scan(prob, raw.shape)[0], gt, task.num_cls)
            if not tta:
                centres = F.interpolate(prob[None], size=raw.shape, mode="trilinear", align_corners=False)[0]
                row["trilinear (centres)"] = organ_dice(centres.argmax(0).cpu().numpy(), gt, task.num_cls)
                grid_labels = prob.argmax(0).to(torch.uint8).cpu().numpy()
                for rule in ("round", "floor"):
                    row[f"nearest ({rule})"] = organ_dice(nearest_labels(grid_labels, raw.shape, rule), gt,
                                                          task.num_cls)
        print(f"case {case_id} {raw.shape}: mean organ Dice " +
              ", ".join(f"{k} {np.nanmean(v):.2f}" for k, v in row.items()))
        rows.append(row)
    table = {k: np.nanmean([r[k] for r in rows], axis=0) for k in rows[0]}  # per organ, mean over cases
    learned = table["trilinear"] > 1
    names = [n for n, keep in zip(task.class_names, learned) if keep]
    print(f"{len(rows)} test cases; Dice x100 against the raw labels, mean over cases; organs the model segments "
          f"(Dice > 1): {', '.join(names)}")
    print(f"{'':20s} {'all organs':>10s} {'learned':>8s} " + " ".join(f"{n[:10]:>10s}" for n in names))
    for key, values in table.items():
        print(f"{key:20s} {np.nanmean(values):10.2f} {np.nanmean(values[learned]):8.2f} " +
              " ".join(f"{v:10.2f}" for v in values[learned]))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", type=int, nargs=3, default=(148, 512, 512), metavar=("D", "H", "W"))
    p.add_argument("--n_filters", type=int, default=8)
    p.add_argument("--reps", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--phantom_exp", default=None, help="a trained phantom run: measure accuracy instead of time")
    p.add_argument("--cps", default="AB", choices=("A", "B", "AB"))
    args = p.parse_args()
    device = torch.device(args.device)
    if args.phantom_exp:
        accuracy(args, device)
    else:
        print_times(stages(args, device))


if __name__ == "__main__":
    main()
