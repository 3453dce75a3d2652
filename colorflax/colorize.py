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

from colorflax import cli, files, hints, image_io
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


def _by_stem(folder, extensions):
  """{name without extension: path} of `folder`'s files with one of `extensions` (the first in
  sorted order where several share a name): --reference_dir's and --hints_dir's lookup."""
  found = {}
  for name in sorted(os.listdir(folder)):
    stem, ext = os.path.splitext(name)
    if ext.lower() in extensions:
      found.setdefault(stem, os.path.join(folder, name))
  return found


class _References:
  """--reference_dir: each input's reference photo, the folder's image with the input's name
  (any image extension; the first in sorted order if several), embedded once."""

  def __init__(self, folder, predictor):
    self.folder, self.predictor, self.embeddings = folder, predictor, {}
    self.by_stem = _by_stem(folder, image_io.IMAGE_EXTENSIONS)

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


class _Hints:
  """--hints FILE (the same points for every input) or --hints_dir DIR (each input's own file,
  DIR/<its name>.json): each input's colour hint channels on the model's grid."""

  def __init__(self, predictor, shared=None, folder=None):
    self.predictor, self.shared, self.folder = predictor, shared, folder  # shared: read_points'
    self.by_stem = _by_stem(folder, ('.json',)) if folder else {}

  def channels_for(self, path, gray):
    """(the hint channels (1, h, w, 3) of the input at `path`, None) or (None, why not)."""
    points = self.shared
    if points is None:
      stem = os.path.splitext(os.path.basename(path))[0]
      if stem not in self.by_stem:
        return None, f'no hints for it in {self.folder} (a file named {stem}.json)'
      try:
        points = hints.read_points(self.by_stem[stem])
      except UserError as e:
        return None, str(e)
    try:
      return self.predictor.hint_channels(points, gray, path), None
    except UserError as e:
      return None, str(e)


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
    self.hints = None  # a _Hints: each input's colour hints

  def add(self, path, name, why_not):
    out = name and os.path.join(self.output, name)
    if out and os.path.abspath(out) in self.inputs:
      why_not = f'refusing to overwrite an input: {out}'
    elif out and self.skip_existing and os.path.isfile(out):  # outputs are renamed whole
      self.kept.append(out)
      return
    if why_not:
      self.failed.append((path, why_not))
    elif video.is_video(path) and self.hints:
      self.failed.append((path, 'colour hints are for images, not videos'))
    elif video.is_video(path):
      self.flush()  # in input order
      self.add_video(path, out)
    else:
      gray, why_not = _read_gray(path)
      embedding = hint_channels = None
      if not why_not and self.references:
        embedding, why_not = self.references.embedding_for(path)
      if not why_not and self.hints:
        hint_channels, why_not = self.hints.channels_for(path, gray[0])
      if why_not:
        self.failed.append((path, why_not))
        return
      self.batch.append((path, out, gray, embedding, hint_channels))
      if len(self.batch) >= self.batch_size:
        self.flush()

  def flush(self):
    grays = [g for _, _, (g, _), _, _ in self.batch]
    embeddings = hint_channels = None
    if self.references and self.batch:
      embeddings = np.concatenate([e for *_, e, _ in self.batch])
    if self.hints:
      hint_channels = [h for *_, h in self.batch]
    ab = self.predictor.colorize_batch(grays, embeddings, hint_channels) if self.batch else []
    for (path, out, (_, l_full), _, _), ab_small in zip(self.batch, ab):
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
    hints_file=None,
    hints_dir=None,
):
  """Writes OUTPUT/<name>.png for each input image, OUTPUT/<name> for each video; returns
  (written paths, [(path, error)], outputs left as they were because `skip_existing` found them).

  `inception_weights` overrides the features' recorded weights (None: use the record).
  `video_stats`, a dict: filled with each video's figures (video.colorize_video). `reference`:
  a photo whose global embedding every input gets instead of its own; `reference_dir`: a
  folder holding each input's reference under the input's name (an input without one fails).
  `hints_file`: colour hints (colorflax.hints' JSON) for every input, `hints_dir`: a folder of
  them by the input's name, for a model trained with hints."""
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
  if hints_file and hints_dir:
    raise UserError('give --hints (one file for all inputs) or --hints_dir, not both')
  if hints_dir and not os.path.isdir(hints_dir):
    raise UserError(f'--hints_dir {hints_dir}: no such folder')
  # A bad file is refused before the model loads.
  shared_points = hints.read_points(hints_file) if hints_file else None
  predictor = colorizer_lib.Colorizer(workdir, config, which, size, inception_weights, temperature)
  if hints_file or hints_dir:
    hints.require(predictor.model, workdir)
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
  if hints_file or hints_dir:
    run.hints = _Hints(predictor, shared_points, hints_dir)
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
  cli.define_workdir(flags, size_help=cli.WORKING_SIZE_HELP)
  define = dict(flag_values=flags)
  absl_flags.DEFINE_string(
      'output', None, 'Folder for the colorized PNGs (created if needed).', **define
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
  absl_flags.DEFINE_string(
      'hints',
      None,
      'A model trained with colour hints: a JSON file of points of known colour for every input, '
      '{"points": [{"x": X, "y": Y, "rgb": "#rrggbb"}, ...]} in the image\'s own pixels (the '
      "colour's lightness is not used).",
      **define,
  )
  absl_flags.DEFINE_string(
      'hints_dir',
      None,
      "A folder of hints files, one per input, found by the input's name (photo.jpg: "
      'photo.json); an input without one is skipped and reported.',
      **define,
  )


def main(argv, flags):
  if not flags.output:
    raise UserError('--output is required')
  if len(argv) < 2:
    raise UserError('give at least one input image or folder')
  config = cli.load_workdir_config(flags)
  json_path = cli.output_file(flags.json, 'json')
  if json_path:
    files.check_writable(os.path.dirname(json_path), 'json')
  weights = cli.inception_weights_override(flags, config)
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
      hints_file=flags.hints,
      hints_dir=flags.hints_dir,
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
