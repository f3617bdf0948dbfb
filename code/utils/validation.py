"""Validation during training: one centre crop per eval volume, hard Dice per foreground class (Q35,
docs/original-quirks.md).

See docs/pipeline.md#validation-and-checkpoints — argmax of ``method.predict``; ``(2TP + ε) / (2TP + FP + FN + 2ε)``
with ε = 1e-8 per volume, so a class absent from both crop and prediction scores 0.5; mean over volumes per class.
fp32, eval mode.

The volumes are iterated through a DataLoader with the original's settings (batch 1, no shuffle, no workers): each
validation thereby draws one number from the global torch generator (the iterator's base seed), as the original
does, so a seeded run keeps the original's random stream (batches, flips, dropout masks) after epoch 0."""
import torch

from utils.loss import hard_dice


def eval_loader(eval_ds):
    """The original's eval DataLoader: batch 1, sequential, in the main process."""
    return torch.utils.data.DataLoader(eval_ds, batch_size=1, shuffle=False, num_workers=0)


@torch.no_grad()
def validate(method, eval_ds, num_cls, device):
    """Per-class (foreground) mean Dice over the eval volumes, a float64 tensor of length C - 1."""
    for net in method.nets.values():
        net.eval()
    total = torch.zeros(num_cls - 1, dtype=torch.float64, device=device)
    for batch in eval_loader(eval_ds):  # creating the iterator draws the one number from the global generator
        x = batch["image"].to(device)
        pred = method.predict(x).argmax(1)[0]
        total += hard_dice(pred, batch["label"][0].to(device), num_cls, do_bg=False).double()
    return (total / len(eval_ds)).cpu()
