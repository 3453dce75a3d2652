"""`python -m colorflax.colorize --workdir DIR --output OUTDIR INPUT...`: colour for real photos.

Each image (grayscale, or colour converted to grayscale first) is shrunk to the model's working
size, which gives the model its L input and Inception its feature (computed here, in torch,
with the settings the training cache recorded). The predicted ab is upsampled to the original
resolution and recombined with the original full-resolution L, so the output keeps the input's
size and detail; chroma is reduced where needed to stay inside the sRGB gamut, so L is kept.
"""

import collections
import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags as absl_flags
from PIL import Image

from colorflax import checkpoints, cli, color, distributed, features_cache, files, image_io
from colorflax import model as model_lib
from colorflax import reporting, signals
from colorflax.errors import UserError


def _walk(path, output):
  """(file, its path relative to the folder above `path`) for the images under folder `path`,
  sorted. The walk skips `output`: with the output folder inside an input folder, running the
  command again must not colorize the previous run's outputs (and nest them one level deeper)."""
  found = []
  skip = (output, output and os.path.join(output, os.path.basename(path)))  # where outputs go
  for dirpath, dirnames, filenames in os.walk(path):
    dirnames[:] = sorted(d for d in dirnames if os.path.join(dirpath, d) not in skip)
    for name in sorted(filenames):
      if name.lower().endswith(image_io.IMAGE_EXTENSIONS):
        full = os.path.join(dirpath, name)
        found.append((full, os.path.relpath(full, os.path.dirname(path))))
  return found


def expand_inputs(inputs, output=None):
  """[(path, output name or None, why not)] for files and folders (recursively), in order,
  without duplicates, and with no two inputs given the same output name."""
  found, seen = [], set()  # (path, relative name or None, why not)
  output = output and os.path.abspath(output)
  for item in inputs:
    path = os.path.abspath(os.path.expanduser(item))
    if os.path.isdir(path):
      found += [(full, rel, None) for full, rel in _walk(path, output)]
    elif os.path.isfile(path):
      found.append((path, os.path.basename(path), None))
    elif os.path.exists(path):  # reported as a failure, like an unreadable file
      found.append((path, None, 'not a regular file (a pipe, a device?): give an image file'))
    else:
      found.append((path, None, 'no such file or folder'))
  unique = []
  for entry in found:
    if entry[0] not in seen:
      seen.add(entry[0])
      unique.append(entry)
  # photo.jpg and photo.png would both become photo.png: such inputs keep their extension in the
  # name (photo.jpg.png, photo.png.png). A clash that remains (a.jpg from two folders, given as
  # files) is refused for the later input: no output overwrites another.
  stem = lambda rel: os.path.splitext(rel)[0] + '.png'
  clashes = collections.Counter(stem(rel).lower() for _, rel, _ in unique if rel)  # A is a: macOS
  taken, result = {}, []
  for path, rel, why_not in unique:
    if why_not:
      result.append((path, None, why_not))
      continue
    out = stem(rel) if clashes[stem(rel).lower()] == 1 else rel + '.png'
    if out.lower() in taken:
      result.append((path, None, f'its output name {out} is taken by {taken[out.lower()]}'))
      continue
    taken[out.lower()] = path
    result.append((path, out, None))
  return result


# The full-resolution work is per pixel, so it runs on flat runs of at most this many pixels,
# each padded to a power of two: images of every size share a few compilations, and nothing
# runs op by op (eagerly, a 12-megapixel photo took 25 s, nearly all of it the gamut fit).
_CHUNK_PIXELS = 1 << 20


def _per_pixel(fn, *images):
  """`fn` (jitted, on (N, C) pixels) applied to (H, W, C) images' pixels -> (H, W, C_out)."""
  h, w = images[0].shape[:2]
  n = h * w
  flat = [np.reshape(x, (n, -1)) for x in images]
  chunk = min(_CHUNK_PIXELS, 1 << max(n - 1, 1).bit_length())
  outputs = []
  for start in range(0, n, chunk):
    parts = [x[start : start + chunk] for x in flat]
    pad = chunk - len(parts[0])
    outputs.append(fn(*(np.pad(p, ((0, pad), (0, 0))) for p in parts)))  # dispatched, not awaited
  return np.concatenate([np.asarray(o) for o in outputs])[:n].reshape(h, w, -1)


@jax.jit
def _gray_and_lightness(rgb):
  """uint8 sRGB (N, 3) -> (N, 2): its grayscale in [0, 1] and that grayscale's L*."""
  gray = color.rgb_to_gray(color.uint8_to_unit(rgb))
  return jnp.stack([gray, color.rgb_to_lab(jnp.repeat(gray[:, None], 3, axis=-1))[:, 0]], axis=-1)


@jax.jit
def _lab_to_srgb_uint8(l, ab):
  """L* (N, 1), predicted a*b* (N, 2) -> uint8 sRGB (N, 3), chroma reduced into the gamut."""
  rgb = color.lab_to_rgb(jnp.concatenate([l, color.fit_ab_to_gamut(l, ab)], axis=-1))
  return (rgb * 255 + 0.5).astype(jnp.uint8)


def _full_res_gray(path):
  """(full-resolution grayscale in [0,1] (H, W), its L* (H, W)) from any image file."""
  gray_and_l = _per_pixel(_gray_and_lightness, np.asarray(image_io.load_rgb(path)))
  return gray_and_l[..., 0], gray_and_l[..., 1]


class Colorizer:
  """Model + Inception for one workdir; `colorize_batch(grays)` -> each image's predicted ab."""

  def __init__(self, workdir, config, which='best', size=0, inception_weights=None):
    from colorflax import inception

    self.size = size or config.data.image_size
    if self.size <= 0 or self.size % 8:
      raise UserError(f'--size must be a positive multiple of 8, got {self.size}')
    mesh = distributed.data_mesh()
    self.model, self.variables, self.step = checkpoints.restore_for_inference(
        workdir, config, which, mesh
    )
    # The features the model was trained on: the training cache's record, unless overridden.
    # A convert_torch workdir has no cache: its config says the seed's (ImageNet logits).
    cache_dir = os.path.expanduser(config.data.cache_dir)
    manifest = features_cache.read_manifest(cache_dir) if os.path.isdir(cache_dir) else None
    if manifest is None and inception_weights is None:
      inception_weights = config.features.inception_weights
    self.inception, self.weights = inception.load_for_cache(manifest, cache_dir, inception_weights)
    self.kind = config.features.kind
    self.resize = config.data.resize
    self._predict = model_lib.make_predict(self.model)

  def working_images(self, gray):
    """Full-res grayscale (H, W) in [0, 1] -> (the model's input, Inception's input), uint8.

    Both are the training cache's view of the image when it is a square. Otherwise the model
    must see the whole frame, or its colours would not line up once upsampled onto it: a
    `center_crop` run (shorter side to the size, then a crop) gets the uncropped image at that
    scale, sides rounded to multiples of 8, as the model is convolutional; Inception still gets
    the crop its features were made from."""
    img = Image.fromarray((gray * 255 + 0.5).astype(np.uint8))
    square = np.asarray(image_io.resize(img, self.size, self.resize), np.uint8)
    if self.resize == 'squash':
      return square, square
    scale = self.size / min(img.size)
    whole = img.resize(
        tuple(max(8, round(side * scale / 8) * 8) for side in img.size), Image.Resampling.BOX
    )
    return np.asarray(whole, np.uint8), square

  def colorize_batch(self, grays):
    """Full-res grayscale images (list of (H, W)) -> each one's predicted ab/128 at its working
    size."""
    from colorflax import inception

    inputs, squares = zip(*(self.working_images(g) for g in grays))
    emb = inception.embed(self.inception, inception.preprocess(np.stack(squares)), self.kind)
    by_shape = collections.defaultdict(
        list
    )  # one batch per input shape (eval mode: images are independent)
    for i, x in enumerate(inputs):
      by_shape[x.shape].append(i)
    ab = [None] * len(grays)
    for rows in by_shape.values():
      small = np.stack([inputs[i] for i in rows])
      l_small = np.asarray(
          color.rgb_to_lab(np.repeat(small[..., None], 3, -1).astype(np.float32) / 255.0)
      )[..., :1]
      for i, out in zip(
          rows, np.asarray(self._predict(self.variables, l_small / color.L_SCALE, emb[rows]))
      ):
        ab[i] = out
    return ab


def recombine(l_full, ab_small):
  """Full-res L (H, W) + working-size ab/128 (h, w, 2) -> uint8 RGB (H, W, 3) at full size."""
  h, w = l_full.shape
  ab = np.stack(
      [
          np.asarray(
              Image.fromarray(ab_small[..., c].astype(np.float32), 'F').resize(
                  (w, h), Image.Resampling.BILINEAR
              )
          )
          for c in range(2)
      ],
      axis=-1,
  ) * np.float32(color.AB_SCALE)
  return _per_pixel(_lab_to_srgb_uint8, l_full.astype(np.float32)[..., None], ab)


def save_png(rgb, out):
  """Writes uint8 RGB as the PNG `out`, aside then renamed: a full disk or Ctrl-C never leaves a
  cut-off file behind. Returns None, or why it could not be written; a disk that takes no more
  (full, read-only) stops the run (UserError): every later output would fail the same way."""
  aside = out + '.tmp.png'
  try:
    os.makedirs(os.path.dirname(out), exist_ok=True)
    Image.fromarray(rgb).save(aside)
    os.replace(aside, out)
  except OSError as e:
    if e.errno in files.NO_SPACE + files.NOT_WRITABLE:
      raise UserError(
          f'cannot write {out}: {files.why(e)} (with --skip_existing, the images done are kept)'
      ) from None
    return f'cannot write {out}: {e.strerror or e}'
  finally:
    if os.path.isfile(aside):
      os.remove(aside)
  return None


def _read_gray(path):
  """(full-res grayscale, its L*) of an input, or the reason it cannot be used."""
  try:
    if os.path.getsize(path) == 0:
      raise image_io.SkipImage('empty file')
    return _full_res_gray(path), None
  except (image_io.SkipImage, OSError) as e:
    return None, str(e)


def colorize(
    workdir,
    config,
    inputs,
    output,
    which='best',
    size=0,
    inception_weights=None,
    batch_size=8,
    progress=True,
    skip_existing=False,
):
  """Writes OUTPUT/<name>.png for each input; returns (written paths, [(path, error)], outputs
  left as they were because `skip_existing` found them).

  `inception_weights` overrides the features' recorded weights (None: use the record)."""
  # Checked before the model loads: a bad --output is found in a second, not after a batch.
  output = cli.output_folder(output, 'output')
  items = expand_inputs(inputs, output)
  if not items:
    raise UserError('no input images given')
  input_paths = {p for p, _, _ in items}
  colorizer = Colorizer(workdir, config, which, size, inception_weights)
  # Once the model, its checkpoint and --size are known good: a refused run leaves no folder.
  files.create_folder(output, 'output')
  files.check_writable(output, 'output')
  written, failed, kept, batch = [], [], [], []

  def flush():
    ab = colorizer.colorize_batch([g for _, _, (g, _) in batch]) if batch else []
    for (path, out, (_, l_full)), ab_small in zip(batch, ab):
      error = save_png(recombine(l_full, ab_small), out)
      if error:
        failed.append((path, error))
      else:
        written.append(out)
    batch.clear()

  try:
    for path, name, why_not in reporting.progress_bar(
        items, desc='colorize', unit='img', disable=not progress
    ):
      out = name and os.path.join(output, name)
      if out and os.path.abspath(out) in input_paths:
        why_not = f'refusing to overwrite an input: {out}'
      elif out and skip_existing and os.path.isfile(out):  # outputs are renamed whole: this one is
        kept.append(out)
        continue
      elif out:
        gray, why_not = _read_gray(path)
      if why_not:
        failed.append((path, why_not))
        continue
      batch.append((path, out, gray))
      if len(batch) >= batch_size:
        flush()
    flush()
  except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM / SIGHUP (signals.Stopped)
    done = len(written) + len(kept)
    raise signals.Interrupted(
        f'with {done} of {len(items)} images colorized in {output} (each output complete; '
        f'{len(written)} by this run): run the same command with --skip_existing to do the rest',
        e,
    ) from None
  return written, failed, kept


def define_flags(flags):
  cli.define_config(flags, for_workdir=True)
  define = dict(flag_values=flags)
  absl_flags.DEFINE_string('workdir', None, 'A training (or convert_torch) workdir.', **define)
  absl_flags.DEFINE_string(
      'output', None, 'Folder for the colorized PNGs (created if needed).', **define
  )
  absl_flags.DEFINE_string('checkpoint', 'best', "'best', 'latest' or a step number.", **define)
  absl_flags.DEFINE_integer(
      'size',
      0,
      'Working resolution (multiple of 8); 0 = the training image size.',
      lower_bound=0,
      **define,
  )
  absl_flags.DEFINE_bool(
      'skip_existing',
      False,
      'Leave the inputs whose output PNG is there '
      'already, e.g. to finish an interrupted run (outputs are only ever '
      'complete files).',
      **define,
  )


def main(argv, flags):
  if not flags.workdir:
    raise UserError('--workdir is required')
  if not flags.output:
    raise UserError('--output is required')
  if len(argv) < 2:
    raise UserError('give at least one input image or folder')
  config = cli.load_workdir_config(flags, flags.workdir)
  overridden = 'features.inception_weights' in cli.override_values(flags)
  weights = config.features.inception_weights if overridden else None
  written, failed, kept = colorize(
      flags.workdir,
      config,
      argv[1:],
      flags.output,
      flags.checkpoint,
      flags.size,
      weights,
      skip_existing=flags.skip_existing,
  )
  signals.work_done()  # every output is written
  for path, reason in failed:
    print(f'skipped {path}: {reason}')
  print(
      f'colorized {len(written)} image(s) into {flags.output}'
      + (f'; {len(kept)} already there (--skip_existing)' if kept else '')
      + (f'; {len(failed)} failed' if failed else '')
  )
  return 1 if failed else 0


def entry_point():
  cli.run(main, define_flags)


if __name__ == '__main__':
  entry_point()
