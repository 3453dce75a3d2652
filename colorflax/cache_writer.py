"""Writing a features cache: rows streamed to disk, published whole, continued after a stop.

`CacheWriter` streams rows straight to disk (memory stays bounded whatever N is) inside
`CACHE.incomplete/`, and renames it to `CACHE` only when complete, so a killed run never leaves
a cache that looks finished. Meanwhile `CACHE.incomplete/progress.json` records, every few
seconds, how many rows are safely on disk, so that a run stopped by Ctrl-C, a scheduler or a
crash is continued by the next one with the same settings.
"""

import contextlib
import json
import os
import shutil

import numpy as np

from colorflax import files
from colorflax.errors import UserError
from colorflax.features_cache import FORMAT_VERSION, MANIFEST, PROGRESS, incomplete_dir

_HEADER_BYTES = 128  # fixed-size .npy header, rewritten with the final row count


def read_progress(path):
  """A progress record's JSON, or None if it is missing or damaged (it is only a hint)."""
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def _npy_header(shape, dtype) -> bytes:
  """A version 1.0 .npy header padded to exactly _HEADER_BYTES."""
  d = "{'descr': %r, 'fortran_order': False, 'shape': %r, }" % (np.dtype(dtype).str, tuple(shape))
  pad = _HEADER_BYTES - 10 - len(d) - 1
  if pad < 0:
    raise ValueError('shape too long for the fixed .npy header')
  body = (d + ' ' * pad + '\n').encode('latin1')
  return b'\x93NUMPY\x01\x00' + len(body).to_bytes(2, 'little') + body


class _RowFile:
  """Appends rows of a fixed shape to an .npy file whose row count is known only at the end."""

  def __init__(self, path, row_shape, dtype):
    self.path, self.row_shape, self.dtype, self.rows = path, tuple(row_shape), np.dtype(dtype), 0
    self.f = open(path, 'wb')
    self.f.write(_npy_header((0, *self.row_shape), self.dtype))

  @classmethod
  def reopen(cls, path, row_shape, dtype, rows):
    """The file an interrupted build left, cut back to its first `rows` rows, to append to;
    None if it holds fewer (it did not reach the disk)."""
    self = cls.__new__(cls)
    self.path, self.row_shape, self.dtype, self.rows = path, tuple(row_shape), np.dtype(dtype), rows
    size = _HEADER_BYTES + rows * self.dtype.itemsize * int(np.prod(self.row_shape))
    if not os.path.isfile(path) or os.path.getsize(path) < size:
      return None
    self.f = open(path, 'r+b')
    self.f.truncate(size)
    self.f.seek(size)
    return self

  def sync(self):
    self.f.flush()
    os.fsync(self.f.fileno())

  def append(self, rows: np.ndarray):
    rows = np.ascontiguousarray(rows, self.dtype)
    assert rows.shape[1:] == self.row_shape, (rows.shape, self.row_shape)
    self.f.write(rows.tobytes())
    self.rows += len(rows)

  def close(self):
    self.f.seek(0)
    self.f.write(_npy_header((self.rows, *self.row_shape), self.dtype))
    self.f.flush()
    os.fsync(self.f.fileno())
    self.f.close()


class CacheWriter:
  """Streams a cache into CACHE.incomplete/ and publishes it with one rename in `finish`.

  With a `resume_key` (everything the rows depend on), an interrupted build with the same key is
  continued: `resumed` is then the state its last `record_progress` saved, and the rows written
  after that record are cut off. Otherwise (and with another key) it starts again cleanly."""

  def __init__(self, cache_dir, image_size, embedding_dim, expected_rows=0, resume_key=None):
    self.final = os.path.abspath(os.path.expanduser(cache_dir))
    self.tmp = incomplete_dir(cache_dir)
    self.row_bytes = image_size * image_size * 3 + embedding_dim * 4
    self.expected_rows = expected_rows
    self.resume_key, self.resumed, self.files = resume_key, None, []
    images = (os.path.join(self.tmp, 'images.npy'), (image_size, image_size, 3), np.uint8)
    embeddings = (os.path.join(self.tmp, 'embeddings.npy'), (embedding_dim,), np.float32)
    with self.writing():
      progress = read_progress(os.path.join(self.tmp, PROGRESS)) if resume_key is not None else None
      if (
          isinstance(progress, dict)
          and progress.get('key') == json.loads(json.dumps(resume_key))
          and isinstance(progress.get('rows'), int)
          and isinstance(progress.get('state'), dict)
      ):
        self.images = _RowFile.reopen(*images, progress['rows'])
        self.embeddings = _RowFile.reopen(*embeddings, progress['rows'])
        if self.images and self.embeddings:
          self.resumed = progress['state']
          return
        for rows in (self.images, self.embeddings):
          if rows:
            rows.f.close()
      if os.path.exists(self.tmp):
        shutil.rmtree(self.tmp)  # left by a run with other settings (or unusable): start cleanly
      os.makedirs(self.tmp)
      self.images = _RowFile(*images)
      self.embeddings = _RowFile(*embeddings)

  @contextlib.contextmanager
  def writing(self):
    """Around anything written into the cache: a failed write (a full disk, a folder that cannot
    be written) is one line saying what to do, and the partial cache is deleted at once (on a
    full disk, its space is what is needed back)."""
    try:
      yield
    except OSError as e:
      self.abort()
      rows = self.images.rows if hasattr(self, 'images') else 0
      total = max(self.expected_rows, rows)
      if e.errno in files.NO_SPACE:
        need = f'{total} images need about {_size(total * self.row_bytes)}: ' if total else ''
        advice = f'{need}free some space or set data.cache_dir elsewhere'
      elif e.errno in files.NOT_WRITABLE:
        advice = f'{os.path.dirname(self.final)} cannot be written: set data.cache_dir elsewhere'
      else:
        advice = 'run the same command again'
      done = f'{rows} of {total}' if total else f'{rows}'
      raise UserError(
          f'cannot write the features cache at {self.final}: {e.strerror or e} (after {done} '
          f'images; the partial cache was deleted). {advice}'
      ) from None

  def append(self, images, embeddings, ids):
    assert len(images) == len(embeddings) == len(ids)
    with self.writing():
      self.images.append(images)
      self.embeddings.append(embeddings)
    self.files.extend(ids)

  def record_progress(self, state: dict):
    """Saves `state` (what the caller needs to continue) with the rows written so far, once they
    are on disk: a later run with the same key continues from here."""
    with self.writing():
      self.images.sync()
      self.embeddings.sync()
      path = os.path.join(self.tmp, PROGRESS)
      with open(path + '.tmp', 'w') as f:
        json.dump({'key': self.resume_key, 'rows': self.images.rows, 'state': state}, f)
      os.replace(path + '.tmp', path)

  def finish(self, manifest: dict) -> str:
    with self.writing():
      return self._finish(manifest)

  def _finish(self, manifest):
    self.images.close()
    self.embeddings.close()
    if os.path.exists(os.path.join(self.tmp, PROGRESS)):
      os.remove(os.path.join(self.tmp, PROGRESS))
    manifest = {
        **manifest,
        'format_version': FORMAT_VERSION,
        'num_images': self.images.rows,
        'files': self.files,
    }
    with open(os.path.join(self.tmp, MANIFEST), 'w') as f:
      json.dump(manifest, f, indent=1)
      f.flush()
      os.fsync(f.fileno())
    if os.path.exists(self.final):  # --overwrite: swap, so the old cache is never half-gone
      old = self.final.rstrip('/') + '.old'
      shutil.rmtree(old, ignore_errors=True)
      os.replace(self.final, old)
      os.replace(self.tmp, self.final)
      shutil.rmtree(old)
    else:
      os.replace(self.tmp, self.final)
    return self.final

  def keep(self):
    """Closes the files of an interrupted build, leaving it (and its last progress record) for
    the next run to continue."""
    for rows in (getattr(self, 'images', None), getattr(self, 'embeddings', None)):
      if rows is not None and not rows.f.closed:
        try:
          rows.f.close()
        except OSError:  # rows it cannot flush (a full disk): the progress record predates them
          pass

  def abort(self):
    """Closes and deletes the partial cache (a run killed outright leaves it for the next run,
    which continues it or clears it)."""
    self.keep()
    shutil.rmtree(self.tmp, ignore_errors=True)


def _size(nbytes):
  for unit, scale in (('GB', 2**30), ('MB', 2**20)):
    if nbytes >= scale:
      return f'{nbytes / scale:.1f} {unit}'
  return f'{nbytes / 2**10:.0f} KB'
