"""Videos through colorize: the clip's frames, rate, size, duration and sound kept; its cut found;
colour steadier than frame by frame; nothing cut off left behind; bad videos skipped."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from skimage import color as skcolor

from colorflax import color, colorize, colorizer, precompute_features, signals, synthetic, train
from colorflax import video

av = pytest.importorskip('av', reason="the video tests need PyAV: pip install -e '.[test]'")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, 'tests'))
from test_train import small_config  # noqa: E402


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  root = tmp_path_factory.mktemp('video')
  config = small_config(root / 'cache', num_epochs=2, samples_every_epochs=0)
  precompute_features.precompute(config, progress=False)
  train.train_and_evaluate(config, str(root / 'run'), progress=False)
  synthetic.video_clip(root / 'clip.mp4')  # 24 frames at 12 fps, a cut at frame 12, a tone
  return root, config


def _frames(path):
  with av.open(str(path)) as c:
    return np.stack([f.to_ndarray(format='rgb24') for f in c.decode(video=0)])


def _colorize_cli(root, output, *args):
  """`python -m colorflax.colorize` with the trained run, its completed process."""
  cmd = [sys.executable, '-m', 'colorflax.colorize', f'--workdir={root / "run"}']
  return subprocess.run(
      cmd + [f'--output={output}', *map(str, args)],
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=600,
  )


def _describe(path):
  """(frames, frame rate, width, height, duration s, audio: (codec, rate, duration s) or None)."""
  with av.open(str(path)) as c:
    v = c.streams.video[0]
    frames = sum(1 for _ in c.decode(video=0))
    a = c.streams.audio[0] if c.streams.audio else None
    audio = a and (a.codec_context.name, a.sample_rate, round(float(a.duration * a.time_base), 2))
    return frames, v.average_rate, v.width, v.height, round(c.duration / 1e6, 2), audio


def test_a_clip_keeps_its_frames_and_sound_its_cut_is_found_and_its_colour_is_steady(
    trained, tmp_path
):
  root, config = trained
  stats = {}
  written, failed, _ = colorize.colorize(
      str(root / 'run'),
      config,
      [str(root / 'clip.mp4')],
      str(tmp_path / 'out'),
      progress=False,
      video_stats=stats,
  )
  out = tmp_path / 'out' / 'clip.mp4'
  assert failed == [] and written == [str(out)]
  assert (
      _describe(out) == _describe(root / 'clip.mp4') == (24, 12, 96, 64, 2.0, ('aac', 44100, 2.0))
  )
  with av.open(str(out)) as c:
    assert c.streams.video[0].codec_context.name == 'h264'
  [figures] = stats.values()
  assert figures['cuts'] == [12] and figures['shots'] == 2 and figures['frames'] == 24
  # One embedding per shot and smoothing within it: steadier than each frame on its own.
  assert figures['flicker'] < 0.8 * figures['flicker_frame_by_frame']
  assert np.isfinite(figures['psnr']) and figures['colorfulness_true'] > 10
  # Its lightness is the input's, within H.264's rounding (4:2:0 chroma at colour edges).
  gray = np.asarray(color.rgb_to_gray(_frames(root / 'clip.mp4') / np.float32(255)))
  l_in = skcolor.rgb2lab(np.repeat(gray[..., None], 3, -1))[..., 0]
  l_out = skcolor.rgb2lab(_frames(out) / 255.0)[..., 0]
  assert np.abs(l_in - l_out).mean() < 1.5 and np.percentile(np.abs(l_in - l_out), 99) < 5


def test_cuts_are_found_where_the_scene_changes_and_nowhere_else():
  clip = synthetic.video_frames(frames=30, cut=17)
  histograms = [video.histogram(np.asarray(color.rgb_to_gray(f / np.float32(255)))) for f in clip]
  cuts = [i for i in range(1, 30) if video.is_cut(histograms[i - 1], histograms[i])]
  assert cuts == [17]


def test_a_stop_leaves_no_video_behind_and_skip_existing_keeps_finished_ones(
    trained, tmp_path, monkeypatch
):
  root, config = trained
  out = tmp_path / 'out'
  real, calls = colorizer.recombine, []

  def stop_at_the_tenth_frame(*args):
    calls.append(1)
    if len(calls) == 10:
      raise signals.Stopped(15)
    return real(*args)

  monkeypatch.setattr(colorizer, 'recombine', stop_at_the_tenth_frame)
  with pytest.raises(signals.Interrupted, match='with 0 of 1 images colorized'):
    colorize.colorize(str(root / 'run'), config, [str(root / 'clip.mp4')], str(out), progress=False)
  assert os.listdir(out) == []  # no cut-off video, no .partial
  monkeypatch.undo()
  written, _, _ = colorize.colorize(
      str(root / 'run'), config, [str(root / 'clip.mp4')], str(out), progress=False
  )
  before = os.stat(written[0]).st_mtime_ns
  written, _, kept = colorize.colorize(
      str(root / 'run'),
      config,
      [str(root / 'clip.mp4')],
      str(out),
      progress=False,
      skip_existing=True,
  )
  assert written == [] and kept == [str(out / 'clip.mp4')]
  assert os.stat(kept[0]).st_mtime_ns == before


def test_frames_stream_through_in_batches(trained, tmp_path, monkeypatch):
  # A long video never has more than a batch of its frames in memory: decoding, colour and
  # encoding go frame by frame; each pass over the video holds at most BATCH frames.
  root, config = trained
  monkeypatch.setattr(video, 'BATCH', 4)
  real, sizes = video._Colour.frames, []
  monkeypatch.setattr(
      video._Colour, 'frames', lambda self, frames: sizes.append(len(frames)) or real(self, frames)
  )
  colorize.colorize(
      str(root / 'run'), config, [str(root / 'clip.mp4')], str(tmp_path / 'o'), progress=False
  )
  assert sum(sizes) == 24 and max(sizes) == 4


@pytest.mark.parametrize('ext', ['.webm', '.gif'])
def test_other_containers_are_written_as_they_came(trained, tmp_path, ext):
  root, config = trained
  source = tmp_path / f'clip{ext}'
  with av.open(str(root / 'clip.mp4')) as c, av.open(str(source), 'w') as out:
    codec = {'.webm': 'libvpx-vp9', '.gif': 'gif'}[ext]
    stream = out.add_stream(codec, rate=12)
    stream.width, stream.height = 96, 64
    stream.pix_fmt = 'rgb8' if ext == '.gif' else 'yuv420p'
    for frame in c.decode(video=0):
      fresh = av.VideoFrame.from_ndarray(frame.to_ndarray(format='rgb24'), format='rgb24')
      fresh.pts = round(frame.time * 12)
      out.mux(stream.encode(fresh))
    out.mux(stream.encode(None))
  written, failed, _ = colorize.colorize(
      str(root / 'run'), config, [str(source)], str(tmp_path / 'out'), progress=False
  )
  assert failed == [] and written == [str(tmp_path / 'out' / f'clip{ext}')]
  assert _describe(written[0])[:4] == _describe(source)[:4]


def test_a_damaged_video_is_skipped_and_the_other_inputs_still_go_through(trained, tmp_path):
  root, config = trained
  (tmp_path / 'in').mkdir()
  data = (root / 'clip.mp4').read_bytes()  # its index (moov) at the end, as x264's mp4 has it
  (tmp_path / 'in' / 'cut_off.mp4').write_bytes(data[: len(data) // 2])
  with (
      av.open(str(root / 'clip.mp4')) as c,
      av.open(str(tmp_path / 'indexed.mp4'), 'w', options={'movflags': 'faststart'}) as out,
  ):
    streams = {s.index: out.add_stream_from_template(s) for s in c.streams}
    for packet in c.demux():
      if packet.dts is not None:
        packet.stream = streams[packet.stream.index]
        out.mux(packet)
  data = (tmp_path / 'indexed.mp4').read_bytes()  # its index first: frames decode up to the cut
  (tmp_path / 'in' / 'cut_off_indexed.mp4').write_bytes(data[: 2 * len(data) // 3])
  (tmp_path / 'in' / 'not_a_video.mp4').write_bytes(b'plain text, not a video')
  Image.fromarray(synthetic.landscape(3, 64)).save(tmp_path / 'in' / 'photo.png')
  r = _colorize_cli(root, tmp_path / 'out', tmp_path / 'in')
  assert r.returncode == 1, r.stderr[-3000:]  # some inputs failed
  assert 'Traceback' not in r.stderr, r.stderr[-3000:]
  skipped = dict(
      line[len('skipped ') :].split(': ', 1)
      for line in r.stdout.splitlines()
      if line.startswith('skipped ')
  )
  assert skipped == {
      f'{tmp_path}/in/cut_off.mp4': skipped[f'{tmp_path}/in/cut_off.mp4'],
      f'{tmp_path}/in/cut_off_indexed.mp4': skipped[f'{tmp_path}/in/cut_off_indexed.mp4'],
      f'{tmp_path}/in/not_a_video.mp4': skipped[f'{tmp_path}/in/not_a_video.mp4'],
  }
  cut = re.fullmatch(
      r'cut off: (\d+) of its 24 frames could be decoded',
      skipped[f'{tmp_path}/in/cut_off_indexed.mp4'],
  )
  assert cut and 0 < int(cut.group(1)) < 24
  assert skipped[f'{tmp_path}/in/cut_off.mp4'].startswith('not a readable video (')
  assert skipped[f'{tmp_path}/in/not_a_video.mp4'].startswith('not a readable video (')
  assert os.listdir(tmp_path / 'out' / 'in') == ['photo.png']  # nothing of the bad videos


def test_colorize_json_has_each_videos_figures(trained, tmp_path):
  root, _ = trained
  r = _colorize_cli(
      root, tmp_path / 'out', f'--json={tmp_path / "v.json"}', '--temporal=0', root / 'clip.mp4'
  )
  assert r.returncode == 0, r.stderr[-3000:]
  figures = json.loads((tmp_path / 'v.json').read_text())[str(root / 'clip.mp4')]
  assert figures['temporal'] == 0 and figures['cuts'] == [12]
  # Without smoothing, a shot's single embedding still steadies the colour.
  assert figures['flicker'] < figures['flicker_frame_by_frame']


def test_a_reference_photo_gives_every_shot_its_embedding(trained, tmp_path, monkeypatch):
  # --reference_dir finds clip.mp4's reference as clip.*; both shots, every frame, get its
  # embedding instead of the mean of their own frames'.
  root, config = trained
  refs = tmp_path / 'refs'
  refs.mkdir()
  Image.fromarray(synthetic.landscape(5, 96)).save(refs / 'clip.png')
  real, seen = colorizer.Colorizer.colorize_batch, []

  def recording(self, grays, embeddings=None):
    seen.append(None if embeddings is None else np.array(embeddings))
    return real(self, grays, embeddings)

  monkeypatch.setattr(colorizer.Colorizer, 'colorize_batch', recording)
  written, failed, _ = colorize.colorize(
      str(root / 'run'),
      config,
      [str(root / 'clip.mp4')],
      str(tmp_path / 'out'),
      progress=False,
      reference_dir=str(refs),
  )
  assert failed == [] and len(written) == 1 and seen
  reference = colorizer.Colorizer(str(root / 'run'), config).embed_reference(str(refs / 'clip.png'))
  for embeddings in seen:
    assert embeddings is not None and np.allclose(embeddings, reference, rtol=1e-5, atol=1e-5)
