"""Validation during training: one centre crop per eval volume, hard Dice per foreground class (Q35).

Spec: methods/dhc.md §8 — argmax of ``method.predict``; ``(2TP + ε) / (2TP + FP + FN + 2ε)`` with ε = 1e-8 per volume,
so a class absent from both crop and prediction scores 0.5; mean over volumes per class. fp32, eval mode."""
import torch

from utils.loss import hard_dice


@torch.no_grad()
def validate(method, eval_ds, num_cls, device):
    """Per-class (foreground) mean Dice over the eval volumes, a float64 tensor of length C - 1."""
    for net in method.nets.values():
        net.eval()
    total = torch.zeros(num_cls - 1, dtype=torch.float64, device=device)
    for i in range(len(eval_ds)):
        sample = eval_ds[i]
        x = sample["image"].unsqueeze(0).to(device)
        pred = method.predict(x).argmax(1)[0]
        total += hard_dice(pred, sample["label"].to(device), num_cls, do_bg=False).double()
    return (total / len(eval_ds)).cpu()
