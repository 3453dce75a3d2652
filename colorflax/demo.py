"""`python -m colorflax.demo --workdir DIR [--port 7860] [--host 127.0.0.1]`: a local web page
that colorizes photos with a trained model (Gradio).

Drop or pick one or more photos, colour or grayscale: each is shown as grayscale | colorized |
original (a colour photo is desaturated first, so the result can be compared with it), with a
before/after slider for the first, and the colorized PNGs to download at their original size.
A classification model gets a temperature slider. A file that cannot be used (not an image,
too large, unreadable) gets a message on the page; the server keeps serving.
"""

import os
import tempfile
import traceback

from absl import flags as absl_flags

from colorflax import cli, image_io, signals
from colorflax.errors import UserError

TITLE = 'colorflax'
DEFAULT_MAX_MEGAPIXELS = 50  # a 12-megapixel photo takes seconds on a CPU; 50 leaves room


class Demo:
  """The page's work, apart from Gradio: `colorize(paths, temperature)` -> what the page shows."""

  def __init__(self, predictor, max_pixels, output_dir):
    self.predictor = predictor
    self.max_pixels = max_pixels
    self.output_dir = output_dir
    objective = predictor.objective
    self.temperature = objective.temperature if objective.name == 'classification' else None

  def colorize_one(self, path, temperature=None):
    """(grayscale, colorized, original) uint8 RGB arrays, and the PNG written; SkipImage."""
    import numpy as np
    from PIL import Image

    from colorflax import colorizer

    if os.path.getsize(path) == 0:
      raise image_io.SkipImage('empty file')
    rgb = np.asarray(image_io.load_rgb(path, self.max_pixels))
    gray, lightness = colorizer.gray_and_lightness(rgb)
    ab = self.predictor.colorize_batch([gray], temperature=temperature)[0]
    colorized = colorizer.recombine(lightness, ab)
    gray_rgb = np.repeat((gray * 255 + 0.5).astype(np.uint8)[..., None], 3, axis=-1)
    name = os.path.splitext(os.path.basename(path))[0] + '_colorized.png'
    folder = tempfile.mkdtemp(dir=self.output_dir)  # one per result: names never collide
    out = os.path.join(folder, name)
    Image.fromarray(colorized).save(out)
    return (gray_rgb, colorized, rgb), out

  def colorize(self, paths, temperature=None):
    """(gallery [(image, caption)], slider (gray, colorized) or None, downloads, message)."""
    gallery, downloads, problems, slider = [], [], [], None
    for path in paths or []:
      name = os.path.basename(path)
      try:
        (gray, colorized, original), out = self.colorize_one(path, temperature)
      except image_io.SkipImage as e:
        problems.append(f'**{name}**: {e}')
        continue
      except OSError as e:
        problems.append(f'**{name}**: cannot be read ({e.strerror or e})')
        continue
      except Exception as e:  # the page says so and keeps serving; the console has the details
        traceback.print_exc()
        problems.append(f'**{name}**: failed ({type(e).__name__}: {e})')
        continue
      gallery += [(gray, f'{name}: grayscale'), (colorized, f'{name}: colorized')]
      gallery.append((original, f'{name}: original'))
      downloads.append(out)
      slider = slider or (gray, colorized)
    if not paths:
      message = 'Drop or pick one or more photos, then press Colorize.'
    else:
      message = f'Colorized {len(downloads)} of {len(paths)} file(s).'
    if problems:
      message += '\n\n' + '\n\n'.join(problems)
    return gallery, slider, downloads, message


def build_page(demo):
  """The Gradio Blocks of `demo` (not launched)."""
  import gradio as gr

  with gr.Blocks(title=TITLE) as page:
    gr.Markdown(
        f'# {TITLE}\nColour for grayscale photos. Colour photos are desaturated first, so the '
        'result can be compared with the original.'
    )
    with gr.Row():
      with gr.Column(scale=1):
        files = gr.File(label='Photos', file_count='multiple', type='filepath', elem_id='photos')
        temperature = gr.Slider(
            0.05,
            1.0,
            value=demo.temperature or 0.38,
            step=0.01,
            label='Temperature (small: vivid, 1: safe)',
            visible=demo.temperature is not None,
            elem_id='temperature',
        )
        button = gr.Button('Colorize', variant='primary', elem_id='colorize')
        message = gr.Markdown(elem_id='message')
      with gr.Column(scale=2):
        slider = gr.ImageSlider(
            label='Before / after (the first photo)', type='numpy', elem_id='slider'
        )
        gallery = gr.Gallery(label='Grayscale | colorized | original', columns=3, elem_id='gallery')
        downloads = gr.File(
            label='Colorized, original size (PNG)', file_count='multiple', elem_id='downloads'
        )

    def run(paths, t):
      return demo.colorize(paths, t if demo.temperature is not None else None)

    button.click(run, inputs=[files, temperature], outputs=[gallery, slider, downloads, message])
  return page


def _require_gradio():
  try:
    import gradio  # noqa: F401
  except ImportError:
    raise UserError('the demo needs Gradio: pip install -e ".[demo]"') from None


def serve(
    workdir,
    config,
    host='127.0.0.1',
    port=7860,
    which='best',
    size=0,
    max_megapixels=DEFAULT_MAX_MEGAPIXELS,
    inception_weights=None,
):
  """Loads the model and serves the page until interrupted. `inception_weights` overrides the
  features' recorded weights (None: the record), as in colorize."""
  _require_gradio()
  os.environ.setdefault('GRADIO_ANALYTICS_ENABLED', 'False')  # no calls home from a local demo
  import gradio as gr

  from colorflax import colorizer

  predictor = colorizer.Colorizer(workdir, config, which, size, inception_weights)
  output_dir = tempfile.mkdtemp(prefix='colorflax-demo-')
  demo = Demo(predictor, int(max_megapixels * 1e6), output_dir)
  page = build_page(demo)
  # System fonts: the default theme's web fonts would be fetched from Google on every load.
  theme = gr.themes.Default(
      font=['ui-sans-serif', 'system-ui', 'sans-serif'], font_mono=['ui-monospace', 'monospace']
  )
  print(f'colorflax demo: {workdir} (step {predictor.step}) on http://{host}:{port}', flush=True)
  page.queue(default_concurrency_limit=1)  # one model, one request at a time
  try:
    _launch(page, host, port, theme, output_dir, max_megapixels)
  except OSError as e:  # Gradio's "Cannot find empty port in range"
    raise UserError(f'--port {port}: cannot serve on {host}:{port} ({e})') from None


def _launch(page, host, port, theme, output_dir, max_megapixels):
  page.launch(
      server_name=host,
      server_port=port,
      theme=theme,
      allowed_paths=[output_dir],
      max_file_size=f'{max(1, int(max_megapixels * 4))}mb',
      show_error=False,
      quiet=True,
      footer_links=[],
  )


def define_flags(flags):
  cli.define_workdir(flags, size_help=cli.WORKING_SIZE_HELP)
  define = dict(flag_values=flags)
  absl_flags.DEFINE_string(
      'host', '127.0.0.1', 'Address to serve on (0.0.0.0: every interface).', **define
  )
  absl_flags.DEFINE_integer('port', 7860, 'Port to serve on.', lower_bound=1, **define)
  absl_flags.DEFINE_float(
      'max_megapixels',
      DEFAULT_MAX_MEGAPIXELS,
      'Larger photos get a message instead of a result.',
      lower_bound=0.01,
      **define,
  )


def main(argv, flags):
  if len(argv) > 1:
    raise UserError(f'unexpected arguments: {" ".join(argv[1:])}')
  if not flags.workdir:
    raise UserError('--workdir is required')
  config = cli.load_workdir_config(flags, flags.workdir)
  serve(
      flags.workdir,
      config,
      flags.host,
      flags.port,
      flags.checkpoint,
      flags.size,
      flags.max_megapixels,
      cli.inception_weights_override(flags, config),
  )
  signals.work_done()
  return 0


def entry_point():
  cli.run(main, define_flags)


if __name__ == '__main__':
  entry_point()
