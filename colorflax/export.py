"""`python -m colorflax.export --workdir DIR --output OUT [--size S] [--overwrite]`: a trained
colorizer as one self-contained ONNX model, Inception-v3 inside.

OUT gets three files:
  colorizer.onnx   gray (B, S, S, 1) and inception_gray (B, S, S, 1), grayscale in [0, 1]
                   (+ hints (B, S, S, 3) for a model trained with them; zeros: none)
                   -> ab (B, S, S, 2), the predicted a*b* in Lab units. The batch is dynamic.
  colorizer.json   the input convention: size, resize mode, grayscale weights, loss, temperature.
  colorize.py      colorizes image files with only onnxruntime, NumPy and Pillow
                   (colorflax/onnx_colorize.py).

The graph is two exports joined: Inception-v3 (torch's exporter: the grayscale resized to 299
and ImageNet-normalised, as colorflax.inception does) feeds the embedding to the Flax model
(jax2onnx), whose L* input and decoding (classification: the annealed mean at the run's
temperature) are inside. The size is fixed (--size, default the training size): jax2onnx
cannot express the model's "a multiple of 8" sides symbolically, and the model is trained at
one square size anyway.
"""

import contextlib
import io
import json
import logging
import os
import shutil
import tempfile

from absl import flags as absl_flags

from colorflax import cli, color, signals
from colorflax.errors import UserError

OPSET = 21  # both exporters at the same opset, so the two graphs can be joined
SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'onnx_colorize.py')
FILES = ('colorizer.onnx', 'colorizer.json', 'colorize.py')


def _require_exporters():
  try:
    import jax2onnx  # noqa: F401
    import onnx  # noqa: F401
    import onnxscript  # noqa: F401  (torch's exporter)
  except ImportError as e:
    raise UserError(
        f'export needs {e.name}: pip install -e ".[export]" (jax2onnx, onnx, onnxruntime)'
    ) from None


def _inception_graph(net, kind, size):
  """ONNX of inception_gray (B, S, S, 1) in [0, 1] -> embedding (B, D), as inception.embed."""
  import torch
  import torch.nn.functional as F

  from colorflax import inception

  class Embed(torch.nn.Module):

    def __init__(self):
      super().__init__()
      # As inception.embed: the network up to its 2048-d average pool, then fc unless 'pool'.
      # (`net` is the export's own copy, loaded for it: changing it is safe.)
      self.fc, net.fc = net.fc, torch.nn.Identity()
      self.net = net
      self.register_buffer('mean', torch.tensor(inception.IMAGENET_MEAN).view(1, 3, 1, 1))
      self.register_buffer('std', torch.tensor(inception.IMAGENET_STD).view(1, 3, 1, 1))

    def forward(self, gray):
      x = gray.permute(0, 3, 1, 2)
      x = F.interpolate(
          x, size=(inception.INPUT_SIZE,) * 2, mode='bilinear', align_corners=False, antialias=True
      )
      pool = self.net((x.expand(-1, 3, -1, -1) - self.mean) / self.std)
      if kind == 'pool':
        return pool
      logits = self.fc(pool)
      return torch.softmax(logits, -1) if kind == 'probs' else logits

  import onnx

  module = Embed().eval().float().to(memory_format=torch.contiguous_format).cpu()
  example = torch.zeros(2, size, size, 1)
  buffer = io.BytesIO()
  with torch.no_grad():
    program = torch.onnx.export(
        module,
        (example,),
        input_names=['inception_gray'],
        output_names=['embedding'],
        dynamic_shapes=({0: torch.export.Dim('batch')},),
        opset_version=OPSET,
        dynamo=True,
        verbose=False,
    )
  program.save(buffer)
  return onnx.load_from_string(buffer.getvalue())


def _colorizer_graph(predictor, objective, size, embedding_dim):
  """ONNX of (gray, embedding[, hints]) -> ab in Lab units, the Flax model in eval mode."""
  import jax.numpy as jnp
  from jax2onnx import to_onnx

  # The plain layers: the CPU training variants (conv inputs kept for the gradient, dec3_0's
  # polyphase form) compute the same values with more operations.
  model = predictor.model.clone(materialize_conv_inputs=False, polyphase_dec3=False)
  variables = predictor.variables

  upsample = _upsample_matrix(size // 2)  # the classification head's grid is half the size

  def colorize(gray, embedding, hints=None):
    l_norm = color.rgb_to_lab(jnp.repeat(gray, 3, axis=-1))[..., :1] / color.L_SCALE
    output = model.apply(variables, l_norm, embedding, train=False, hints=hints)
    if objective.name != 'classification':
      return objective.decode(output) * color.AB_SCALE
    # objective.decode's jax.image.resize, which jax2onnx cannot convert with a dynamic batch,
    # as the linear map it is on each axis: (2n, n) matrices, the resize of the identity.
    ab = objective.decode_half(output)
    return jnp.einsum('Yy,Xx,byxc->bYXc', upsample, upsample, ab) * color.AB_SCALE

  inputs = [('B', size, size, 1), ('B', embedding_dim)]
  names = ['gray', 'embedding']
  if model.hints:
    inputs.append(('B', size, size, 3))
    names.append('hints')
  # onnx_ir warns of every shape value it leaves untyped: harmless, and a screenful.
  logging.getLogger('onnx_ir').setLevel(logging.ERROR)
  with _jax_left_as_it_was():
    return to_onnx(
        colorize,
        inputs,
        model_name='colorflax',
        opset=OPSET,
        input_names=names,
        output_names=['ab'],
    )


def _upsample_matrix(n):
  """(2n, n): jax.image.resize(x, 2n, 'linear') of any x (n,) is this matrix times x."""
  import jax
  import numpy as np

  return np.asarray(jax.image.resize(np.eye(n, dtype=np.float32), (2 * n, n), 'linear'))


@contextlib.contextmanager
def _jax_left_as_it_was():
  """jax2onnx patches jax's functions while it traces, and leaves some patched (jax2onnx 0.17:
  `jnp.cumsum`, which then refuses a positional axis): the rest of the process, training in
  the same session say, gets jax back as it was."""
  import jax

  modules = (jax.numpy, jax.lax, jax.nn, jax.image, jax.random)
  saved = [dict(vars(m)) for m in modules]
  try:
    yield
  finally:
    for module, before in zip(modules, saved):
      for name, value in before.items():
        if vars(module).get(name) is not value:
          setattr(module, name, value)


def _join(inception_graph, colorizer_graph):
  """One model: inception_gray -> embedding, fed to the colorizer's `embedding` input."""
  import onnx
  from onnx import compose

  ir = min(inception_graph.ir_version, colorizer_graph.ir_version)
  inception_graph.ir_version = colorizer_graph.ir_version = ir
  joined = compose.merge_models(
      inception_graph,
      colorizer_graph,
      io_map=[('embedding', 'embedding')],
      prefix1='inception/',
      prefix2='colorizer/',
  )
  # The prefixes keep inner names apart; the interface keeps its plain names.
  renames = {}
  for graph, prefix in ((inception_graph, 'inception/'), (colorizer_graph, 'colorizer/')):
    renames.update({prefix + v.name: v.name for v in (*graph.graph.input, *graph.graph.output)})
  for node in joined.graph.node:
    node.input[:] = [renames.get(n, n) for n in node.input]
    node.output[:] = [renames.get(n, n) for n in node.output]
  for value in (*joined.graph.input, *joined.graph.output):
    value.name = renames.get(value.name, value.name)
  onnx.checker.check_model(joined, full_check=False)
  return joined


def export(
    workdir,
    config,
    output,
    which='best',
    size=0,
    temperature=None,
    inception_weights=None,
    overwrite=False,
):
  """Writes OUTPUT/{colorizer.onnx, colorizer.json, colorize.py}; returns the JSON's dict."""
  from colorflax import colorizer as colorizer_lib
  from colorflax import losses
  from colorflax import model as model_lib

  output = cli.output_folder(output, 'output')
  if os.path.exists(output) and not overwrite:
    raise UserError(f'--output {output} exists: give a new folder, or --overwrite to replace it')
  if config.get('loss', 'mse') not in losses.LOSSES:
    raise UserError(f"{workdir}: unknown loss {config.get('loss')!r}; export knows {losses.LOSSES}")
  _require_exporters()
  predictor = colorizer_lib.Colorizer(workdir, config, which, size, inception_weights, temperature)
  objective = losses.objective(config, temperature=temperature)
  kind = config.features.kind
  size = predictor.size
  print(f'exporting Inception-v3 ({predictor.weights}, {kind}) with torch.onnx', flush=True)
  inception_graph = _inception_graph(predictor.inception, kind, size)
  print(f'exporting the colorizer (step {predictor.step}, {size} px) with jax2onnx', flush=True)
  colorizer_graph = _colorizer_graph(predictor, objective, size, model_lib.EMBEDDING_DIMS[kind])
  model = _join(inception_graph, colorizer_graph)
  meta = {
      'format': 'colorflax-onnx',
      'version': 1,
      'size': size,
      'inputs': [v.name for v in model.graph.input],
      'output': 'ab (batch, size, size, 2): a*b* in Lab units (CIE L*a*b*, D65)',
      'gray': 'the grayscale (luminance weights gray_weights on sRGB in [0, 1]) of the image, '
      'squashed to size x size (Pillow BOX filter), in [0, 1]',
      'inception_gray': 'the same for resize=squash; for center_crop, the central square '
      '(shorter side to size, Pillow BOX filter)',
      'gray_weights': list(color.GRAY_WEIGHTS),
      'resize': config.data.resize,
      'loss': objective.name,
      'temperature': objective.temperature if objective.name == 'classification' else None,
      'features': kind,
      'inception_weights': predictor.weights,
      'step': int(predictor.step),
      'opset': OPSET,
  }
  if 'hints' in meta['inputs']:
    meta['hints'] = 'colorflax.hints channels: hint a/128, hint b/128, mask (zeros: no hints)'
  parent = os.path.dirname(output)
  os.makedirs(parent, exist_ok=True)
  # Written aside and renamed whole: a failed export leaves no half folder, nor loses the old.
  aside = tempfile.mkdtemp(prefix=f'.{os.path.basename(output)}.', dir=parent)
  try:
    import onnx

    onnx.save(model, os.path.join(aside, 'colorizer.onnx'))
    with open(os.path.join(aside, 'colorizer.json'), 'w') as f:
      json.dump(meta, f, indent=2)
    shutil.copyfile(SCRIPT, os.path.join(aside, 'colorize.py'))
    if os.path.exists(output):
      old = tempfile.mkdtemp(prefix=f'.{os.path.basename(output)}.old.', dir=parent)
      os.replace(output, os.path.join(old, 'x'))
      os.replace(aside, output)
      shutil.rmtree(old, ignore_errors=True)
    else:
      os.replace(aside, output)
  except OSError as e:
    from colorflax import files

    raise UserError(f'cannot write {output}: {files.why(e)}') from None
  finally:
    shutil.rmtree(aside, ignore_errors=True)
  return meta


def define_flags(flags):
  cli.define_workdir(
      flags, size_help="The model's fixed input size (a multiple of 8); 0 = the training size."
  )
  define = dict(flag_values=flags)
  absl_flags.DEFINE_string(
      'output', None, 'Folder to write (colorizer.onnx, colorizer.json, colorize.py).', **define
  )
  cli.define_temperature(flags)
  absl_flags.DEFINE_bool('overwrite', False, 'Replace --output if it exists.', **define)


def main(argv, flags):
  if len(argv) > 1:
    raise UserError(f'unexpected arguments: {" ".join(argv[1:])}')
  if not flags.output:
    raise UserError('--output is required')
  config = cli.load_workdir_config(flags)
  weights = cli.inception_weights_override(flags, config)
  meta = export(
      flags.workdir,
      config,
      flags.output,
      flags.checkpoint,
      flags.size,
      flags.temperature,
      weights,
      flags.overwrite,
  )
  signals.work_done()
  size_mb = os.path.getsize(os.path.join(flags.output, 'colorizer.onnx')) / 2**20
  print(
      f'exported {flags.workdir} (step {meta["step"]}, {meta["size"]} px, loss {meta["loss"]}) '
      f'to {flags.output}: colorizer.onnx ({size_mb:.1f} MB), colorizer.json, colorize.py\n'
      f'  try it: python {os.path.join(flags.output, "colorize.py")} {flags.output} '
      'photo.jpg --output colorized/'
  )
  return 0


def entry_point():
  cli.run(main, define_flags)


if __name__ == '__main__':
  entry_point()
