"""`python -m colorflax.colorize --workdir DIR --output OUTDIR INPUT...`: colour for real photos
and videos.

Each image (grayscale, or colour converted to grayscale first) is colorized at the model's
working size and recombined with its own full-resolution L (colorflax.colorizer): the output
keeps the input's size, detail and lightness. A video (colorflax.video) keeps its frames,
frame rate, duration and sound, with one global embedding per shot and its colour smoothed over
time.
"""

import collections
import json
import os

import numpy as np
from absl import flags as absl_flags
from PIL import Image

from colorflax import cli, files, image_io
from colorflax import colorizer as colorizer_lib
from colorflax import reporting, signals, video
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
      if name.lower().endswith(image_io.IMAGE_EXTENSIONS + video.VIDEO_EXTENSIONS):
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
  # files) is refused for the later input: no output overwrites another. A video keeps its name.
  stem = lambda rel: rel if video.is_video(rel) else os.path.splitext(rel)[0] + '.png'
  clashes = collections.Counter(stem(rel).lower() for _, rel, _ in unique if rel)  # A is a: macOS
  taken, result = {}, []
  for path, rel, why_not in unique:
    if why_not:
      result.append((path, None, why_not))
      continue
    keep_extension = clashes[stem(rel).lower()] > 1 and not video.is_video(rel)
    out = rel + '.png' if keep_extension else stem(rel)
    if out.lower() in taken:
      result.append((path, None, f'its output name {out} is taken by {taken[out.lower()]}'))
      continue
    taken[out.lower()] = path
    result.append((path, out, None))
  return result


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
    return colorizer_lib.full_res_gray(path), None
  except (image_io.SkipImage, OSError) as e:
    return None, str(e)


class _References:
  """--reference_dir: each input's reference photo, the folder's image with the input's name
  (any image extension; the first in sorted order if several), embedded once."""

  def __init__(self, folder, predictor):
    self.folder, self.predictor, self.embeddings, self.by_stem = folder, predictor, {}, {}
    for name in sorted(os.listdir(folder)):
      stem, ext = os.path.splitext(name)
      if ext.lower() in image_io.IMAGE_EXTENSIONS:
        self.by_stem.setdefault(stem, os.path.join(folder, name))

  def embedding_for(self, path):
    """(the embedding (1, D) of `path`'s reference, None) or (None, why there is none)."""
    stem = os.path.splitext(os.path.basename(path))[0]
    ref = self.by_stem.get(stem)
    if ref is None:
      return None, f'no reference for it in {self.folder} (an image named {stem}.*)'
    if ref not in self.embeddings:
      try:
        self.embeddings[ref] = self.predictor.embed_reference(ref)
      except (image_io.SkipImage, OSError) as e:
        return None, f'its reference {ref}: {e}'
    return self.embeddings[ref], None


class _Outputs:
  """The outputs of one colorize run, input by input: images in batches, videos one by one."""

  def __init__(
      self, predictor, output, inputs, batch_size, skip_existing, temporal, video_stats, progress
  ):
    self.predictor, self.output, self.inputs, self.batch_size = (
        predictor,
        output,
        inputs,
        batch_size,
    )
    self.skip_existing, self.temporal, self.video_stats = skip_existing, temporal, video_stats
    self.progress = progress
    self.written, self.failed, self.kept, self.batch = [], [], [], []
    self.references = None  # a _References: each input's own reference photo

  def add(self, path, name, why_not):
    out = name and os.path.join(self.output, name)
    if out and os.path.abspath(out) in self.inputs:
      why_not = f'refusing to overwrite an input: {out}'
    elif out and self.skip_existing and os.path.isfile(out):  # outputs are renamed whole
      self.kept.append(out)
      return
    if why_not:
      self.failed.append((path, why_not))
    elif video.is_video(path):
      self.flush()  # in input order
      self.add_video(path, out)
    else:
      gray, why_not = _read_gray(path)
      embedding = None
      if not why_not and self.references:
        embedding, why_not = self.references.embedding_for(path)
      if why_not:
        self.failed.append((path, why_not))
        return
      self.batch.append((path, out, gray, embedding))
      if len(self.batch) >= self.batch_size:
        self.flush()

  def flush(self):
    grays = [g for _, _, (g, _), _ in self.batch]
    embeddings = None
    if self.references and self.batch:
      embeddings = np.concatenate([e for *_, e in self.batch])
    ab = self.predictor.colorize_batch(grays, embeddings) if self.batch else []
    for (path, out, (_, l_full), _), ab_small in zip(self.batch, ab):
      error = save_png(colorizer_lib.recombine(l_full, ab_small), out)
      if error:
        self.failed.append((path, error))
      else:
        self.written.append(out)
    self.batch.clear()

  def add_video(self, path, out):
    with_stats = self.video_stats is not None
    if self.references:
      self.predictor.reference, why_not = self.references.embedding_for(path)
      if why_not:
        self.failed.append((path, why_not))
        return
    try:
      stats = video.colorize_video(
          path, out, self.predictor, self.temporal, with_stats, self.progress
      )
    except video.SkipVideo as e:
      self.failed.append((path, str(e)))
      return
    finally:
      if self.references:
        self.predictor.reference = None
    self.written.append(out)
    if with_stats:
      self.video_stats[path] = stats


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
    temporal=video.TEMPORAL,
    video_stats=None,
    temperature=None,
    reference=None,
    reference_dir=None,
):
  """Writes OUTPUT/<name>.png for each input image, OUTPUT/<name> for each video; returns
  (written paths, [(path, error)], outputs left as they were because `skip_existing` found them).

  `inception_weights` overrides the features' recorded weights (None: use the record).
  `video_stats`, a dict: filled with each video's figures (video.colorize_video). `reference`:
  a photo whose global embedding every input gets instead of its own; `reference_dir`: a
  folder holding each input's reference under the input's name (an input without one fails)."""
  # Checked before the model loads: a bad --output is found in a second, not after a batch.
  output = cli.output_folder(output, 'output')
  items = expand_inputs(inputs, output)
  if not items:
    raise UserError('no input images given')
  if reference and reference_dir:
    raise UserError('give --reference (one photo for all inputs) or --reference_dir, not both')
  if reference and not os.path.isfile(reference):
    raise UserError(f'--reference {reference}: no such file')
  if reference_dir and not os.path.isdir(reference_dir):
    raise UserError(f'--reference_dir {reference_dir}: no such folder')
  predictor = colorizer_lib.Colorizer(workdir, config, which, size, inception_weights, temperature)
  if reference:
    predictor.use_reference(reference)
  # Once the model, its checkpoint and --size are known good: a refused run leaves no folder.
  files.create_folder(output, 'output')
  files.check_writable(output, 'output')
  run = _Outputs(
      predictor,
      output,
      {p for p, _, _ in items},
      batch_size,
      skip_existing,
      temporal,
      video_stats,
      progress,
  )
  if reference_dir:
    run.references = _References(reference_dir, predictor)
  try:
    for path, name, why_not in reporting.progress_bar(
        items, desc='colorize', unit='file', disable=not progress
    ):
      run.add(path, name, why_not)
    run.flush()
  except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM / SIGHUP (signals.Stopped)
    done = len(run.written) + len(run.kept)
    raise signals.Interrupted(
        f'with {done} of {len(items)} images colorized in {output} (each output complete; '
        f'{len(run.written)} by this run): run the same command with --skip_existing to do the '
        'rest',
        e,
    ) from None
  return run.written, run.failed, run.kept


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
      'Leave the inputs whose output is there already, e.g. to finish an interrupted run '
      '(outputs are only ever complete files).',
      **define,
  )
  absl_flags.DEFINE_float(
      'temporal',
      video.TEMPORAL,
      "Videos: the weight of the previous frame's colour within a shot (0 = none, each "
      'frame on its own).',
      lower_bound=0.0,
      upper_bound=0.99,
      **define,
  )
  absl_flags.DEFINE_string(
      'json',
      None,
      "Also write each video's figures to this JSON file: its shots and cuts, its flicker and "
      "frame-by-frame colorization's, and for a colour video PSNR and colourfulness against it "
      '(these cost a second prediction per frame).',
      **define,
  )
  cli.define_temperature(flags)
  absl_flags.DEFINE_string(
      'reference',
      None,
      'A photo whose scene steers the colours: every input (and video frame) gets its global '
      'Inception embedding instead of its own.',
      **define,
  )
  absl_flags.DEFINE_string(
      'reference_dir',
      None,
      "A folder of reference photos, one per input, found by the input's name (photo.jpg: "
      'photo.*); an input without one is skipped and reported.',
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
  json_path = cli.output_file(flags.json, 'json')
  if json_path:
    files.check_writable(os.path.dirname(json_path), 'json')
  overridden = 'features.inception_weights' in cli.override_values(flags)
  weights = config.features.inception_weights if overridden else None
  stats = {} if json_path else None
  written, failed, kept = colorize(
      flags.workdir,
      config,
      argv[1:],
      flags.output,
      flags.checkpoint,
      flags.size,
      weights,
      skip_existing=flags.skip_existing,
      temporal=flags.temporal,
      video_stats=stats,
      temperature=flags.temperature,
      reference=flags.reference,
      reference_dir=flags.reference_dir,
  )
  if json_path:
    with files.atomic(json_path) as f:
      json.dump(stats, f, indent=2)
  signals.work_done()  # every output is written
  for path, reason in failed:
    print(f'skipped {path}: {reason}')
  print(
      f'colorized {len(written)} file(s) into {flags.output}'
      + (f'; {len(kept)} already there (--skip_existing)' if kept else '')
      + (f'; {len(failed)} failed' if failed else '')
  )
  return 1 if failed else 0


def entry_point():
  cli.run(main, define_flags)


if __name__ == '__main__':
  entry_point()
