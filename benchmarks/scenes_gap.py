"""Where a digit-scenes run loses its mean digit IoU: finding the strokes, or naming the digit.

For each evaluation set of a finished run (last checkpoint), prints
- mean digit IoU (classes 1-10) and background IoU, as the report computes them;
- stroke IoU: digit against background, whatever the digit class (how well the strokes are found);
- class accuracy on the pixels that are digit in both the label and the prediction (how well they are named);
- mean digit IoU with those pixels given their true class: the ceiling that naming every found stroke right
  would reach with the same masks.

``python benchmarks/scenes_gap.py RUN_DIR [--max N]`` (docs/demo/scenes_design.md quotes its figures).
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
import torch.nn.functional as F

from asg.api import load_run

NUM_CLASSES, IGNORE = 11, 255


def iou_per_class(pred: np.ndarray, label: np.ndarray) -> np.ndarray:
    """pred, label: int [N, H, W] -> IoU per class [11] (labels 255 ignored)."""
    valid = label != IGNORE
    cm = np.bincount(NUM_CLASSES * label[valid] + pred[valid], minlength=NUM_CLASSES**2)
    cm = cm.reshape(NUM_CLASSES, NUM_CLASSES)
    return np.diag(cm) / np.maximum(cm.sum(0) + cm.sum(1) - np.diag(cm), 1)


def predict(model: torch.nn.Module, dataset: torch.utils.data.Dataset, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The first ``n`` scenes: predictions and labels, int [n, S, S]."""
    preds, labels = [], []
    with torch.inference_mode():
        for i in range(min(n, len(dataset))):
            image, label = dataset[i]
            logits = model(image[None]).logits
            logits = F.interpolate(logits, size=label.shape, mode="bilinear", align_corners=False)
            preds.append(logits.argmax(1)[0].numpy())
            labels.append(label.numpy())
    return np.stack(preds), np.stack(labels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_dir")
    parser.add_argument("--max", type=int, default=300, help="scenes per evaluation set")
    args = parser.parse_args()
    run = load_run(args.run_dir, "last")
    model = run.model.eval()
    for name, dataset in run.data.eval_sets.items():
        pred, label = predict(model, dataset, args.max)
        valid = label != IGNORE
        digit_true, digit_pred = (label >= 1) & valid, (pred >= 1) & valid
        found = digit_true & digit_pred
        stroke_iou = found.sum() / (digit_true | digit_pred).sum()
        named = (pred[found] == label[found]).mean()
        iou = iou_per_class(pred, label)
        ceiling = iou_per_class(np.where(found, label, pred), label)
        print(
            f"{name} ({len(pred)} scenes): digit IoU {100 * iou[1:].mean():.1f}, background IoU "
            f"{100 * iou[0]:.1f} | stroke IoU {100 * stroke_iou:.1f}, class accuracy on found strokes "
            f"{100 * named:.1f} | digit IoU with every found stroke named right "
            f"{100 * ceiling[1:].mean():.1f}"
        )


if __name__ == "__main__":
    main()
