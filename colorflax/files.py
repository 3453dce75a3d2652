"""Writing a result file so that a failure leaves nothing cut off behind.

Every file colorflax writes outside the cache and the checkpoints (config.json, metrics,
`evaluate --json/--per_image`, sample grids) is written aside and renamed once whole; a write
that fails (a full disk, a folder that cannot be written) removes the part written and is one
line saying which file and why.
"""

import contextlib
import errno
import os
import tempfile

from colorflax.errors import UserError

NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)  # a full disk, a quota, a file size limit
NOT_WRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS)


def why(e: OSError) -> str:
  """The reason of a failed write, with what to do about the usual ones."""
  reason = e.strerror or str(e)
  if e.errno in NO_SPACE:
    return f'{reason}: make room and run the same command again'
  if e.errno in NOT_WRITABLE:
    return f'{reason}: the folder cannot be written'
  return reason


def create_folder(path, flag):
  """Creates the folder `path` (and those above it), or a one-line error naming `--flag`."""
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as e:
    raise UserError(f'--{flag} {path}: cannot create the folder ({e.strerror or e})') from None


def check_writable(folder, flag):
  """Refuses now, in one line, a folder that a long run would fail to write into at its end."""
  try:
    with tempfile.TemporaryFile(dir=folder) as f:
      f.write(b'\0')  # a byte, as an empty file would fit on a full disk
      f.flush()
  except OSError as e:
    raise UserError(f'--{flag}: {folder} cannot be written ({e.strerror or e})') from None


@contextlib.contextmanager
def atomic(path, mode='w', **kwargs):
  """`with atomic(path) as f:` writes `path` whole or not at all (a failed write: UserError)."""
  aside = f'{path}.tmp'
  try:
    with open(aside, mode, **kwargs) as f:
      yield f
    os.replace(aside, path)
  except OSError as e:
    raise UserError(f'cannot write {path}: {why(e)}') from None
  finally:
    if os.path.exists(aside):
      try:
        os.remove(aside)
      except OSError:
        pass
