"""Run by tests/test_ddp.py under ``torchrun --nproc_per_node 2`` (gloo) or directly (one process): every method
statistic that becomes state, computed from this rank's half of one fixed global batch (or from the whole batch
in one process); the results go to ``<out>/rank<r>.pt``."""
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "code"))
from utils import distributed  # noqa: E402


def statistics(rows):
    """{name: state} from the global-batch rows ``rows`` (a slice) of two fixed global batches."""
    from train_acisis import ConfidenceArray
    from train_adsh import ADSH, bank_thresholds
    from train_cld import ConfidenceBank
    from train_depl import initial_qhat, update_qhat
    from train_dhc import DiffDW, DistDW
    gen = torch.Generator().manual_seed(0)
    C, shape = 4, (4, 8, 8)
    batches = [(torch.randn(4, C, *shape, generator=gen) * 3, torch.randint(0, C, (4, 1, *shape), generator=gen))
               for _ in range(2)]
    dist_dw, diff_dw = DistDW(C), DiffDW(C)
    dist_dw.weights = torch.ones(C)
    diff_dw.init_weights()
    qhat = initial_qhat(C, shape)
    cld = ConfidenceBank(C, confs=torch.zeros(C), update_iter=2)
    acisis = ConfidenceArray(C, update_iter=2, top_m=2)
    adsh = ADSH(C, tot_iter=5, patch_size=shape)
    for logits, labels in batches:
        z, y = logits[rows], labels[rows]
        dist_dw.get_ema_weights(z)
        diff_weights = diff_dw.cal_weights(z, y)
        qhat = update_qhat(torch.softmax(z, 1), qhat)
        cld.record_data(z, y)
        acisis.record_data(z, y)
        acisis.cal_sampling_rate()
        for part in z.split(2):  # one process: the ranks' batches of 2 one after another (see bank_thresholds)
            adsh_thr = bank_thresholds(adsh, part).clone()
    return {"distdw": dist_dw.weights, "diffdw": diff_weights, "diffdw_state": diff_dw.state_dict(), "qhat": qhat,
            "cld": cld.state_dict(), "acisis": acisis.state_dict(), "adsh": adsh.state_dict(), "adsh_thr": adsh_thr}


if __name__ == "__main__":
    distributed.init_from_env("cpu")
    r, n = distributed.rank(), distributed.world_size()
    half = 4 // n
    torch.save(statistics(slice(r * half, (r + 1) * half)), os.path.join(sys.argv[1], f"rank{r}.pt"))
    distributed.shutdown()
