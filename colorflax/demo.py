"""`python -m colorflax.demo --workdir DIR [--port 7860] [--host 127.0.0.1]`: a local web page
that colorizes photos with a trained model (Gradio).

Drop or pick one or more photos, colour or grayscale: each is shown as grayscale | colorized |
original (a colour photo is desaturated first, so the result can be compared with it), with a
before/after slider for the first (or the one picked in the gallery), and the colorized PNGs to
download at their original size. A classification model gets a temperature slider. A model
trained with colour hints (model.hints) gets a hints panel: click the photo to place a point of
the picked colour and see it colorized again, with the points as the JSON `colorize --hints`
reads. A file that cannot be used (not an image, too large, unreadable) gets a message on the
page; the server keeps serving.
"""

import dataclasses
import functools
import json
import os
import re
import tempfile
import traceback
from typing import Any

from absl import flags as absl_flags

from colorflax import cli, image_io, signals
from colorflax.errors import UserError

TITLE = 'colorflax'
DEFAULT_MAX_MEGAPIXELS = 50  # a 12-megapixel photo takes seconds on a CPU; 50 leaves room
HINT_VIEW_SIDE = 1024  # the hints panel's photo, at most this long: clicks are scaled back
DEFAULT_HINT_COLOUR = '#2e9e3e'  # a green: what a grayscale photo gives no clue of


@dataclasses.dataclass
class Result:
  """What `Demo.colorize` gives the page."""

  gallery: list  # [(image, caption)]: grayscale, colorized, original of each photo
  slider: Any  # (grayscale, colorized) of the first photo, or None
  downloads: list  # the colorized PNGs
  message: str
  paths: list  # the photos colorized, in the gallery's order (three images each)
  hint_state: dict  # the hints panel's (Demo.hint_state): the first photo, no points yet
  hint_view: Any  # the first photo colorized, as the hints panel shows it, or None


class Demo:
  """The page's work, apart from Gradio: `colorize(paths, temperature)` -> what the page shows;
  `choose` puts another of those photos in the slider (and the hints panel); for a model with
  hints, `add_hint`, `undo_hint` and `clear_hints` on the chosen photo."""

  def __init__(self, predictor, max_pixels, output_dir):
    self.predictor = predictor
    self.max_pixels = max_pixels
    self.output_dir = output_dir
    objective = predictor.objective
    self.temperature = objective.temperature if objective.name == 'classification' else None
    self.hints = bool(predictor.model.hints)
    # The last photo read: clicks on the hints panel colorize it again without decoding it again.
    self._photo = functools.lru_cache(maxsize=1)(self._read_photo)

  def _read_photo(self, path):
    """(uint8 RGB, its grayscale in [0, 1], that grayscale's L*, its embedding (1, D))."""
    import numpy as np

    from colorflax import colorizer

    if os.path.getsize(path) == 0:
      raise image_io.SkipImage('empty file')
    rgb = np.asarray(image_io.load_rgb(path, self.max_pixels))
    gray, lightness = colorizer.gray_and_lightness(rgb)
    embedding = self.predictor.embed([self.predictor.working_images(gray)[1]])
    return rgb, gray, lightness, embedding

  def colorize_one(self, path, temperature=None, points=None):
    """(grayscale, colorized, original) uint8 RGB arrays, and the PNG written; SkipImage.
    `points`: colour hints as in `colorize --hints` JSON ([{"x", "y", "rgb"}], the photo's
    pixels), for a model with hints; a bad one is a UserError."""
    import numpy as np
    from PIL import Image

    from colorflax import colorizer, hints

    rgb, gray, lightness, embedding = self._photo(path)
    channels = None
    if points:
      parsed = hints.parse_points({'points': points}, 'hints')
      channels = [self.predictor.hint_channels(parsed, gray, os.path.basename(path))]
    ab = self.predictor.colorize_batch([gray], embedding, channels, temperature)[0]
    colorized = colorizer.recombine(lightness, ab)
    gray_rgb = np.repeat((gray * 255 + 0.5).astype(np.uint8)[..., None], 3, axis=-1)
    suffix = '_hinted.png' if points else '_colorized.png'
    name = os.path.splitext(os.path.basename(path))[0] + suffix
    folder = tempfile.mkdtemp(dir=self.output_dir)  # one per result: names never collide
    out = os.path.join(folder, name)
    Image.fromarray(colorized).save(out)
    return (gray_rgb, colorized, rgb), out

  def colorize(self, paths, temperature=None):
    """A Result: each photo's grayscale, colorized and original, and the hints panel's start."""
    gallery, downloads, problems, slider, first, done = [], [], [], None, None, []
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
      done.append(path)
      if slider is None:
        slider, first = (gray, colorized), (path, colorized)
    if not paths:
      message = 'Drop or pick one or more photos, then press Colorize.'
    else:
      message = f'Colorized {len(downloads)} of {len(paths)} file(s).'
    if problems:
      message += '\n\n' + '\n\n'.join(problems)
    state, view = self.hint_state(None), None
    if first is not None:
      state = self.hint_state(first[0], first[1].shape[:2])
      view = hint_view(first[1], [], state['scale'])
    return Result(gallery, slider, downloads, message, done, state, view)

  @staticmethod
  def hint_state(path, shape=None):
    """The hints panel's state: the photo hints apply to, its hints, and the view's scale."""
    scale = 1.0 if shape is None else min(1.0, HINT_VIEW_SIDE / max(shape))
    return {'path': path, 'points': [], 'scale': scale}

  def hinted(self, state, temperature=None):
    """The chosen photo colorized with its hints: (state, the hints panel's view with the
    points marked (None without hints), slider (grayscale, colorized), PNG, the hints as
    `colorize --hints` JSON, message)."""
    path, points = state['path'], state['points']
    if path is None:
      return state, None, None, None, '', 'Colorize a photo first, then click on it to place hints.'
    name = os.path.basename(path)
    try:
      (gray, colorized, _), out = self.colorize_one(path, temperature, points)
    except (image_io.SkipImage, OSError, UserError) as e:
      return state, None, None, None, '', f'**{name}**: {e}'
    except Exception as e:  # as in colorize: a message, and the server keeps serving
      traceback.print_exc()
      return state, None, None, None, '', f'**{name}**: failed ({type(e).__name__}: {e})'
    if not self.hints:
      return state, None, (gray, colorized), out, '', f'{name}: colorized.'
    state = self.hint_state(path, colorized.shape[:2]) | {'points': points}
    text = json.dumps({'points': points}, indent=1)
    count = f'{len(points)} hint' + ('' if len(points) == 1 else 's')
    return (
        state,
        hint_view(colorized, points, state['scale']),
        (gray, colorized),
        out,
        text,
        f'{name}: colorized with {count}. Click the photo to add one, in the picked colour.',
    )

  def choose(self, path, temperature=None):
    """Photo `path` (one of `colorize`'s) in the slider and the hints panel, with no hints:
    `hinted`'s outputs."""
    return self.hinted(self.hint_state(path), temperature)

  def add_hint(self, state, xy, colour, temperature=None):
    """`hinted`'s outputs with a hint of `colour` at `xy`, a pixel of the hints panel's view,
    added. A colour that cannot be read, or a point the photo refuses, leaves the state as it
    was, with a message."""
    if not self.hints:
      return state, None, None, None, '', WITHOUT_HINTS
    if state['path'] is None:
      return self.hinted(state, temperature)
    try:
      rgb = hex_colour(colour)
    except UserError as e:
      return (*self.hinted(state, temperature)[:5], str(e))
    x, y = (int(v / state['scale']) for v in xy)  # the view's pixel -> the photo's
    added = {**state, 'points': state['points'] + [{'x': x, 'y': y, 'rgb': rgb}]}
    outputs = self.hinted(added, temperature)
    return outputs if outputs[1] is not None else (state, *outputs[1:])

  def undo_hint(self, state, temperature=None):
    """`hinted`'s outputs with the last hint taken away."""
    return self.hinted({**state, 'points': state['points'][:-1]}, temperature)

  def clear_hints(self, state, temperature=None):
    """`hinted`'s outputs with no hints."""
    return self.hinted({**state, 'points': []}, temperature)


WITHOUT_HINTS = 'This model was trained without colour hints (model.hints).'
_SHORT_HEX = re.compile(r'#[0-9a-f]{3}')
_HEX = re.compile(r'#[0-9a-f]{6}(?:[0-9a-f]{2})?')
_RGB_FUNCTION = re.compile(r'rgba?\(\s*([\d.]+)\s*,\s*([\d.]+)\s*,\s*([\d.]+)\s*(?:,[^)]*)?\)')


def hex_colour(value):
  """A colour picker's value ('#rgb', '#rrggbb', '#rrggbbaa', 'rgb(r, g, b)' or 'rgba(...)') as
  '#rrggbb'; UserError if it is none of them."""
  v = str(value or '').strip().lower()
  if _SHORT_HEX.fullmatch(v):
    v = '#' + ''.join(c * 2 for c in v[1:])
  if _HEX.fullmatch(v):
    return v[:7]
  match = _RGB_FUNCTION.fullmatch(v)
  if match:
    return '#' + ''.join(f'{min(255, round(float(c))):02x}' for c in match.groups())
  raise UserError(f'not a colour: {value!r} (expected #rrggbb)')


def hint_view(colorized, points, scale):
  """The hints panel's picture: `colorized` (H, W, 3) uint8 scaled by `scale`, each hint a dot
  of its colour ringed in white and black so that it shows on any background."""
  import numpy as np
  from PIL import Image, ImageDraw

  image = Image.fromarray(colorized)
  if scale < 1:
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    image = image.resize(size, Image.Resampling.LANCZOS)
  draw = ImageDraw.Draw(image)
  r = max(3, round(min(image.size) / 60))
  for p in points:
    x, y = (p['x'] + 0.5) * scale, (p['y'] + 0.5) * scale
    draw.ellipse((x - r - 1, y - r - 1, x + r + 1, y + r + 1), outline='black', width=1)
    draw.ellipse((x - r, y - r, x + r, y + r), fill=p['rgb'], outline='white', width=1)
  return np.asarray(image)


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
            label='Before / after (the first photo, or the one picked in the gallery)',
            type='numpy',
            elem_id='slider',
        )
        gallery = gr.Gallery(label='Grayscale | colorized | original', columns=3, elem_id='gallery')
        downloads = gr.File(
            label='Colorized, original size (PNG)', file_count='multiple', elem_id='downloads'
        )
    colorized_paths = gr.State([])  # the gallery's photos, three images each
    if demo.hints:  # the model was trained to follow colour hints
      state = gr.State(demo.hint_state(None))
      with gr.Group():
        gr.Markdown(
            '### Colour hints\nClick the photo where you know its colour: a point of the picked '
            'colour is placed there and the photo is colorized again. Pick another photo in the '
            'gallery to hint it instead. The points are below as the JSON `colorize --hints` '
            'reads.'
        )
        with gr.Row():
          with gr.Column(scale=1):
            colour = gr.ColorPicker(DEFAULT_HINT_COLOUR, label='Hint colour', elem_id='hint-colour')
            undo = gr.Button('Undo the last hint', elem_id='undo-hint')
            clear = gr.Button('Clear the hints', elem_id='clear-hints')
            hinted_file = gr.File(label='Colorized with these hints (PNG)', elem_id='hinted')
            points = gr.Code(language='json', label='Hints (JSON)', elem_id='hint-json')
          with gr.Column(scale=2):
            view = gr.Image(
                label='Click to place a hint',
                type='numpy',
                interactive=False,
                elem_id='hint-view',
            )
      hint_outputs = [state, view, slider, hinted_file, points, message]

    def temperature_of(t):
      return t if demo.temperature is not None else None

    def run(paths, t):
      r = demo.colorize(paths, temperature_of(t))
      hints_panel = [r.hint_state, r.hint_view, None, ''] if demo.hints else []
      return [r.gallery, r.slider, r.downloads, r.message, r.paths] + hints_panel

    outputs = [gallery, slider, downloads, message, colorized_paths]
    if demo.hints:
      outputs += [state, view, hinted_file, points]  # a new first photo: no hints yet
    button.click(run, inputs=[files, temperature], outputs=outputs)

    def pick(paths, t, evt: gr.SelectData):
      chosen = demo.choose(paths[evt.index // 3], temperature_of(t))
      return chosen if demo.hints else [chosen[2], chosen[5]]  # the slider and the message

    picked = hint_outputs if demo.hints else [slider, message]
    gallery.select(pick, inputs=[colorized_paths, temperature], outputs=picked)
    if demo.hints:

      def place(hint_state, picked, t, evt: gr.SelectData):
        return demo.add_hint(hint_state, evt.index, picked, temperature_of(t))

      view.select(place, inputs=[state, colour, temperature], outputs=hint_outputs)
      undo.click(
          lambda s, t: demo.undo_hint(s, temperature_of(t)), [state, temperature], hint_outputs
      )
      clear.click(
          lambda s, t: demo.clear_hints(s, temperature_of(t)), [state, temperature], hint_outputs
      )
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
  # What the page keeps on disk goes when it stops: the results it offers for download, and
  # Gradio's copies of the uploaded photos (unless GRADIO_TEMP_DIR says where those go; Gradio
  # reads it on import).
  with tempfile.TemporaryDirectory(prefix='colorflax-demo-') as output_dir:
    os.environ.setdefault('GRADIO_TEMP_DIR', os.path.join(output_dir, 'gradio'))
    _require_gradio()
    os.environ.setdefault('GRADIO_ANALYTICS_ENABLED', 'False')  # no calls home from a local demo
    import gradio as gr

    from colorflax import colorizer

    predictor = colorizer.Colorizer(workdir, config, which, size, inception_weights)
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
  config = cli.load_workdir_config(flags)
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
