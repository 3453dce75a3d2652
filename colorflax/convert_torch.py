"""`python -m colorflax.convert_torch SEED.pth --workdir DIR`: a prototype checkpoint -> an
orbax checkpoint that `colorflax.evaluate` and `colorflax.colorize` read like a trained one."""

import os
import shutil

from absl import flags as absl_flags

from colorflax import checkpoints, cli, signals
from colorflax.errors import UserError
from configs import default


def convert(pth_path, workdir, overwrite=False):
  """Writes DIR/checkpoints/0 and DIR/config.json; returns the step written. Only imported
  weights are ever replaced (--overwrite), never a training run's checkpoints."""
  from colorflax import convert as convert_lib  # imports torch: only this command needs it

  model, variables = convert_lib.load_torch_checkpoint(pth_path)
  with checkpoints.workdir_lock(workdir):
    _replace_imported(workdir, overwrite)
    config = default.get_config()
    # The prototype's features: ImageNet Inception-v3 logits (or the pooled 2048 if its dec1
    # says so).
    config.features.inception_weights = 'imagenet'
    config.features.kind = 'logits' if model.embedding_dim == 1000 else 'pool'
    checkpoints.write_config(workdir, config)
    mngr = checkpoints.manager(workdir)
    meta = {
        'epoch': 0,
        'source': checkpoints.IMPORTED,
        'torch_checkpoint': os.path.abspath(pth_path),
    }
    checkpoints.save(mngr, 0, model=variables, meta=meta)
    checkpoints.wait(mngr)
    mngr.close()
  return 0


def _replace_imported(workdir, overwrite):
  """Makes room for the import: refuses a workdir with checkpoints, unless --overwrite and they
  are imported weights too."""
  folder = checkpoints.checkpoint_dir(workdir)
  if not (os.path.isdir(folder) and os.listdir(folder)):
    return
  if not checkpoints.holds_weights_only(workdir):
    raise UserError(
        f'{folder} holds the checkpoints of a training run, which are not replaced: '
        'import into a new --workdir'
    )
  if not overwrite:
    raise UserError(f'{folder} already holds checkpoints; pass --overwrite to replace them')
  shutil.rmtree(folder)


def define_flags(flags):
  define = dict(flag_values=flags)
  absl_flags.DEFINE_string('workdir', None, 'Directory to write the checkpoint into.', **define)
  absl_flags.DEFINE_bool('overwrite', False, 'Replace a checkpoint already in --workdir.', **define)


def main(argv, flags):
  if len(argv) != 2:
    raise UserError('usage: python -m colorflax.convert_torch SEED.pth --workdir DIR')
  if not flags.workdir:
    raise UserError('--workdir is required')
  convert(argv[1], cli.output_folder(flags.workdir, 'workdir'), flags.overwrite)
  signals.work_done()  # the checkpoint is written
  print(f'wrote {checkpoints.checkpoint_dir(flags.workdir)}/0 from {argv[1]}')


def entry_point():
  cli.run(main, define_flags)


if __name__ == '__main__':
  entry_point()
