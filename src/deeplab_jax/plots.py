"""Charts of an evaluation: per-class IoU bars, the normalised confusion matrix, mIoU vs trimap width.

Each chart is drawn with matplotlib's object-oriented API on an Agg canvas (no pyplot, no global
backend change, so a notebook's backend is left alone) and returned as a uint8 RGB array, which the
evaluator writes as PNG beside the eval JSON and to TensorBoard. matplotlib is imported inside the
functions that draw: importing this module (and so training) does not import it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

DPI = 100


def _figure(width: float, height: float) -> Any:
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415 - lazy, see above.
  from matplotlib.figure import Figure  # noqa: PLC0415

  figure = Figure(figsize=(width, height), dpi=DPI)
  FigureCanvasAgg(figure)
  return figure


def _pixels(figure: Any) -> np.ndarray:
  """The drawn figure as uint8 [H, W, 3]."""
  figure.canvas.draw()
  return np.asarray(figure.canvas.buffer_rgba())[..., :3].copy()


def _label_size(num_classes: int) -> float:
  return max(4.0, min(9.0, 200.0 / max(num_classes, 1)))


def per_class_iou_chart(per_class_iou: Mapping[str, float | None], miou: float,
                        title: str = '') -> np.ndarray:
  """Horizontal bars of each class's IoU (classes without an IoU are marked n/a), the mIoU as a
  dashed line and in the title."""
  names = list(per_class_iou)
  values = [per_class_iou[n] for n in names]
  n = len(names)
  figure = _figure(6.5, min(40.0, max(2.5, 0.25 * n + 1.3)))
  ax = figure.add_subplot()
  positions = np.arange(n)
  ax.barh(positions, [0.0 if v is None else v for v in values], color='#4878a8')
  for i, v in enumerate(values):
    ax.text(0.005 if v is None else v + 0.005, i, 'n/a' if v is None else f'{v:.3f}',
            va='center', fontsize=_label_size(n))
  ax.axvline(miou, color='#c44e52', linestyle='--')
  ax.set_yticks(positions, names, fontsize=_label_size(n))
  ax.invert_yaxis()
  ax.set_xlim(0.0, 1.1)
  ax.set_xlabel('IoU (dashed: mIoU)')
  ax.set_title(f'{title or "Per-class IoU"}: mIoU {miou:.4f}', fontsize=10)
  figure.tight_layout()
  return _pixels(figure)


def confusion_chart(confusion: np.ndarray, class_names: Sequence[str], title: str = ''
                    ) -> np.ndarray:
  """The confusion matrix with each ground-truth row divided by its pixel count (rows: ground
  truth, columns: prediction; a row of a class absent from the ground truth stays 0)."""
  cm = np.asarray(confusion, np.float64)
  totals = cm.sum(1, keepdims=True)
  normalised = np.divide(cm, totals, out=np.zeros_like(cm), where=totals > 0)
  n = len(class_names)
  side = min(24.0, max(4.0, 0.32 * n + 2.0))
  figure = _figure(side + 1.0, side)
  ax = figure.add_subplot()
  image = ax.imshow(normalised, cmap='Blues', vmin=0.0, vmax=1.0)
  figure.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
  size = _label_size(n)
  ax.set_xticks(np.arange(n), class_names, rotation=90, fontsize=size)
  ax.set_yticks(np.arange(n), class_names, fontsize=size)
  if n <= 30:
    for i in range(n):
      for j in range(n):
        if normalised[i, j] >= 0.005:
          ax.text(j, i, f'{normalised[i, j]:.2f}', ha='center', va='center', fontsize=size * 0.8,
                  color='white' if normalised[i, j] > 0.5 else 'black')
  ax.set_xlabel('prediction')
  ax.set_ylabel('ground truth')
  ax.set_title(title or 'Confusion matrix (rows normalised)', fontsize=10)
  figure.tight_layout()
  return _pixels(figure)


def trimap_chart(widths: Sequence[int], mious: Sequence[float], miou: float | None = None,
                 title: str = '') -> np.ndarray:
  """mIoU in the band around label boundaries against the band width (the paper's Fig. 5), with
  the whole-image mIoU as a dashed line."""
  figure = _figure(5.5, 3.8)
  ax = figure.add_subplot()
  ax.plot(list(widths), list(mious), marker='o', color='#4878a8', label='trimap band')
  if miou is not None:
    ax.axhline(miou, color='#c44e52', linestyle='--', label=f'whole image {miou:.4f}')
  ax.set_xlabel('trimap width (pixels)')
  ax.set_ylabel('mIoU')
  low = min([*mious, miou if miou is not None else 1.0])
  ax.set_ylim(max(0.0, math.floor(low * 10) / 10 - 0.05), 1.0)
  ax.grid(alpha=0.3)
  ax.legend(loc='lower right', fontsize=8)
  ax.set_title(title or 'Boundary mIoU vs trimap width', fontsize=10)
  figure.tight_layout()
  return _pixels(figure)


def eval_charts(result: Mapping[str, Any], confusion: np.ndarray, class_names: Sequence[str]
                ) -> dict[str, np.ndarray]:
  """{kind: RGB array} of an eval result: `per_class_iou`, `confusion` and, with trimap results,
  `trimap`."""
  where = f"{result.get('split', '')} step {result['step']}".strip()
  charts = {
      'per_class_iou': per_class_iou_chart(result['per_class_iou'], result['miou'],
                                           f'Per-class IoU, {where}'),
      'confusion': confusion_chart(confusion, class_names,
                                   f'Confusion matrix (rows normalised)\n{where}'),
  }
  bands = result.get('trimap') or []
  if bands:
    charts['trimap'] = trimap_chart([b['width'] for b in bands], [b['miou'] for b in bands],
                                    result['miou'], f'Boundary mIoU vs trimap width, {where}')
  return charts
