"""What a training run shows and leaves behind (process 0 only): a progress bar, one JSON line
per epoch in DIR/metrics.jsonl, TensorBoard events (tensorboardX: no TensorFlow needed) and
sample grids in DIR/samples/."""

import json
import os
import sys
import time

import numpy as np

from colorflax import files
from colorflax.errors import UserError


def sample_grid(predict, variables, images, embeddings):
  """grayscale | predicted | actual, one column per image: uint8 (3*S, n*S, 3), or None.

  predict(variables, L/100, embeddings) -> ab/128; images uint8 (n, S, S, 3).
  """
  from colorflax import color

  if len(images) == 0:
    return None
  rgb = np.asarray(images, np.float32) / 255.0
  l_norm, _ = color.normalize_lab(color.rgb_to_lab(rgb))
  pred = predict(variables, l_norm, np.asarray(embeddings, np.float32))
  gray = color.lab_norm_to_rgb(l_norm, np.zeros_like(pred))
  colour = color.lab_norm_to_rgb(l_norm, pred)
  strips = [np.concatenate(list(np.asarray(x)), axis=1) for x in (gray, colour, rgb)]
  return (np.concatenate(strips, axis=0) * 255 + 0.5).astype(np.uint8)


def _summary_writer(logdir):
  """tensorboardX's SummaryWriter, imported without torch.

  tensorboardX imports torch whenever it is installed (only to accept torch tensors), which
  would pull PyTorch into the JAX training process. A None entry in sys.modules makes that
  optional import fail as if torch were absent; it is removed again straight after.
  """
  blocked = 'torch' not in sys.modules
  if blocked:
    sys.modules['torch'] = None
  try:
    from tensorboardX import SummaryWriter
  finally:
    if blocked:
      del sys.modules['torch']
  return SummaryWriter(logdir)


LOG_EVERY_SECONDS = 60  # progress lines when stderr is a log file, not a terminal


def _interactive():
  return sys.stderr.isatty()


class _LogLines:
  """tqdm's file when stderr is not a terminal: each refresh becomes a line of its own."""

  def write(self, text):
    # Carriage returns, and the cursor moves of a bar nested in another (a video's frames).
    text = text.replace('\r', '').replace('\x1b[A', '').strip()
    if text:
      sys.stderr.write(text + '\n')

  def flush(self):
    sys.stderr.flush()


def progress_bar(iterable=None, **kwargs):
  """tqdm's bar on a terminal. In a log file (SLURM, CI, `2> log`) a bar is one endless line of
  carriage returns; there it is a plain line at most every LOG_EVERY_SECONDS instead."""
  from tqdm import tqdm

  if not _interactive():
    kwargs.update(
        file=_LogLines(),
        mininterval=LOG_EVERY_SECONDS,
        dynamic_ncols=False,
        bar_format='{desc}: {n_fmt}/{total_fmt} {unit} ({percentage:.0f}%), {elapsed} elapsed, '
        '{remaining} left, {rate_fmt}{postfix}',
    )
  return tqdm(iterable, **kwargs)


class _Progress:

  def __init__(self, total, initial, enabled):
    self.bar = progress_bar(
        total=total,
        initial=initial,
        unit='step',
        disable=not enabled,
        smoothing=0.05,
        dynamic_ncols=True,
        desc='train',
    )
    self.start, self.images = time.time(), 0

  def update(self, steps, loss, images):
    self.images += images
    rate = self.images / max(time.time() - self.start, 1e-9)
    self.bar.set_postfix(loss=f'{loss:.5f}', img_s=f'{rate:.1f}', refresh=False)
    self.bar.update(steps)

  def close(self):
    self.bar.close()


def _step_of(line):
  """The step of a metrics.jsonl line, or None for a line that is not a whole record."""
  try:
    record = json.loads(line)
  except ValueError:
    return None
  return record.get('step') if isinstance(record, dict) else None


class Reporter:

  def __init__(self, workdir, enabled=True):
    self.workdir, self.enabled = workdir, enabled
    self.metrics_path = os.path.join(workdir, 'metrics.jsonl')
    self._tb = None
    if enabled:
      os.makedirs(workdir, exist_ok=True)

  def progress(self, total, initial, enabled=True):
    return _Progress(total, initial, enabled and self.enabled)

  def truncate_after(self, step):
    """On resume: drop metric lines of epochs the restored checkpoint does not include, and a
    line cut off by a crash in the middle of writing it."""
    if not self.enabled or not os.path.exists(self.metrics_path):
      return
    with open(self.metrics_path) as f:
      kept = [line for line in f if _step_of(line) is not None and _step_of(line) <= step]
    with files.atomic(self.metrics_path) as f:
      f.writelines(kept)

  def _writer(self):
    if self._tb is None:
      self._tb = _summary_writer(os.path.join(self.workdir, 'tensorboard'))
    return self._tb

  def epoch(self, metrics: dict):
    """An epoch's line in metrics.jsonl, TensorBoard and the terminal (before its checkpoint is
    saved: a line whose checkpoint never completed is dropped on resume, by truncate_after)."""
    if not self.enabled:
      return
    try:
      with open(self.metrics_path, 'a') as f:
        f.write(json.dumps(metrics) + '\n')
    except OSError as e:
      raise UserError(f'cannot write {self.metrics_path}: {files.why(e)}') from None
    tb = self._writer()
    for key, value in metrics.items():
      if key not in ('epoch', 'step'):
        tb.add_scalar(key, value, metrics['step'])
    tb.flush()
    from tqdm import tqdm

    tqdm.write(
        f"epoch {metrics['epoch']}: train_loss {metrics['train_loss']:.5f} "
        f"val_loss {metrics['val_loss']:.5f} val_psnr {metrics['val_psnr']:.2f} "
        f"(gray {metrics['val_psnr_gray']:.2f}) lr {metrics['lr']:.2e} "
        f"{metrics['images_per_sec']:.1f} img/s"
    )

  def samples(self, epoch, grid):
    if not self.enabled or grid is None:
      return
    from PIL import Image

    folder = os.path.join(self.workdir, 'samples')
    files.create_folder(folder, 'workdir')
    with files.atomic(os.path.join(folder, f'epoch_{epoch:04d}.png'), 'wb') as f:
      Image.fromarray(np.asarray(grid)).save(f, format='PNG')

  def close(self):
    if self._tb is not None:
      self._tb.close()
