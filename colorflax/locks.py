"""One writer at a time: a workdir is trained (or converted into) by one command, a features cache
is built by one command. Two at once interleave their files (metrics, checkpoints, rows) and
lose both runs.

The lock is `fcntl.flock` on a small file holding the holder's process id: the kernel releases
it when the process ends however it ends (kill -9, a crash), so a lock is never left held.
"""

import contextlib
import fcntl
import os

from colorflax.errors import UserError


class Busy(UserError):
  """Another process holds the lock."""


def _holder(fd):
  try:
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 64).decode(errors='replace').strip()
  except OSError:
    text = ''
  return f'process {text}' if text.isdigit() else 'another process'


@contextlib.contextmanager
def exclusive(lock_file, what, advice='wait for it to finish, or stop it'):
  """Within: this process alone holds `lock_file` (created if needed; its folder must exist).
  Held elsewhere: `Busy`, one line naming `what` and the holder's process id."""
  try:
    fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644)
  except OSError as e:  # the first write of the command: a folder that cannot be written
    raise UserError(f'{what} cannot be written ({lock_file}: {e.strerror or e})') from None
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      raise Busy(f'{what} is in use by {_holder(fd)}: {advice}') from None
    try:  # who holds it, for the next one's message; a full disk only loses that
      os.ftruncate(fd, 0)
      os.pwrite(fd, f'{os.getpid()}\n'.encode(), 0)
    except OSError:
      pass
    yield
  finally:
    os.close(fd)  # releases the lock
