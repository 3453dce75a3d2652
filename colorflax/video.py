"""Colorizing a video: stable colour from frame to frame, the sound kept (`colorize` with a video
among its inputs; PyAV, the `video` extra).

A video is read twice, frame by frame, so that memory stays bounded whatever its length:
1. Shots. A cut wherever a frame's luminance histogram differs from the previous frame's by
   more than CUT_THRESHOLD (the L1 distance of the normalised histograms, 0 to 2). A shot's
   global embedding is the mean of the Inception embeddings of frames sampled through it (about
   EMBEDDINGS_PER_SECOND a second), so that it does not change from frame to frame: per-frame
   embeddings are the largest source of flicker in this model family.
2. Colour. Each frame's ab is predicted with its shot's embedding, smoothed over time within the
   shot (an exponential moving average, `temporal`, reset at every cut), recombined with the
   frame's own full-resolution L and encoded with the input's timestamps; the audio stream is
   copied as it is.

The output has the input's frame count, frame rate, size, duration and container: H.264 for
mp4, mov, mkv and avi, VP9 for webm, and GIF for an animated GIF.
"""

import dataclasses
import os

import numpy as np

from colorflax import color, files, metrics
from colorflax import colorizer as colorizer_lib
from colorflax.errors import UserError

VIDEO_EXTENSIONS = ('.mp4', '.mov', '.mkv', '.webm', '.avi', '.gif')
# Container and video codec of the output, by the input's extension.
OUTPUTS = {
    '.mp4': ('mp4', 'libx264'),
    '.mov': ('mov', 'libx264'),
    '.mkv': ('matroska', 'libx264'),
    '.avi': ('avi', 'libx264'),
    '.webm': ('webm', 'libvpx-vp9'),
    '.gif': ('gif', 'gif'),
}
CUT_THRESHOLD = 0.5  # L1 distance between consecutive luminance histograms that starts a shot
HISTOGRAM_BINS = 32
EMBEDDINGS_PER_SECOND = 2  # frames of a shot whose Inception embeddings make its embedding
TEMPORAL = 0.6  # --temporal: the weight of the previous frame's (smoothed) ab
STATIC_L = 2.0  # a pixel whose L* changes less than this between frames counts as static
BATCH = 8  # frames per device batch


class SkipVideo(Exception):
  """This video cannot be colorized; str(e) says why (the other inputs still are)."""


def is_video(path) -> bool:
  return str(path).lower().endswith(VIDEO_EXTENSIONS)


def _av():
  try:
    import av
  except ImportError:
    raise UserError("colorizing videos needs PyAV: pip install -e '.[video]'") from None
  return av


def _open(path):
  """(container, its video stream, its audio stream or None), or SkipVideo."""
  av = _av()
  try:
    container = av.open(str(path))
  except (av.FFmpegError, OSError, ValueError) as e:
    raise SkipVideo(f'not a readable video ({_reason(e)})') from None
  if not container.streams.video:
    container.close()
    raise SkipVideo('no video stream in it')
  audio = container.streams.audio[0] if container.streams.audio else None
  return container, container.streams.video[0], audio


def _reason(e):
  return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def _decoded(container, stream, audio=None):
  """(input frame or None, audio packet or None) in file order: video frames decoded, audio
  packets as they are. A video cut off or damaged part way: SkipVideo."""
  av = _av()
  streams = [stream] + ([audio] if audio is not None else [])
  count = 0
  try:
    for packet in container.demux(*streams):
      if packet.stream is stream:
        for frame in packet.decode():
          count += 1
          yield frame, None
      elif packet.dts is not None:  # the demuxer's last, empty packet is not muxed
        yield None, packet
  except av.FFmpegError as e:
    raise SkipVideo(f'damaged after {count} frames ({_reason(e)})') from None
  if count == 0:
    raise SkipVideo('no frame could be decoded')
  if stream.frames and count < stream.frames:
    raise SkipVideo(f'cut off: {count} of its {stream.frames} frames could be decoded')


def histogram(gray):
  """The normalised luminance histogram of a grayscale frame in [0, 1]."""
  counts, _ = np.histogram(gray, bins=HISTOGRAM_BINS, range=(0.0, 1.0))
  return counts / max(counts.sum(), 1)


def is_cut(previous, current) -> bool:
  return previous is not None and float(np.abs(current - previous).sum()) > CUT_THRESHOLD


@dataclasses.dataclass
class Shots:
  """Where each shot starts (frame indices, the first 0) and its embedding (shots, D)."""

  starts: list
  embeddings: np.ndarray
  frames: int

  def of(self, frame):
    return int(np.searchsorted(self.starts, frame, side='right')) - 1


def find_shots(path, predictor, progress=None):
  """Pass 1: the cuts, and each shot's embedding (the mean of its sampled frames')."""
  container, stream, _ = _open(path)
  rate = float(stream.average_rate or 25)
  stride = max(1, round(rate / EMBEDDINGS_PER_SECOND))
  starts, sums, counts, queue, previous, index = [], [], [], [], None, -1
  try:
    for index, (frame, _) in enumerate(_decoded(container, stream)):
      gray, _ = colorizer_lib.gray_and_lightness(frame.to_ndarray(format='rgb24'))
      current = histogram(gray)
      if not starts or is_cut(previous, current):
        starts.append(index)
        sums.append(0.0)
        counts.append(0)
      previous = current
      if (index - starts[-1]) % stride == 0:
        queue.append((len(starts) - 1, predictor.working_images(gray)[1]))
      if len(queue) >= BATCH:
        _add_embeddings(predictor, queue, sums, counts)
      if progress is not None:
        progress.update(1)
    _add_embeddings(predictor, queue, sums, counts)
  finally:
    container.close()
  embeddings = np.stack([s / c for s, c in zip(sums, counts)]).astype(np.float32)
  return Shots(starts, embeddings, index + 1)


def _add_embeddings(predictor, queue, sums, counts):
  if not queue:
    return
  embeddings = predictor.embed([square for _, square in queue])
  for (shot, _), e in zip(queue, embeddings):
    sums[shot] = sums[shot] + e
    counts[shot] += 1
  queue.clear()


class _Flicker:
  """The mean |change of ab| (Lab units) between consecutive frames of a shot, over the pixels
  whose L* changed by less than STATIC_L (static regions), at the model's working size."""

  def __init__(self):
    self.total, self.pixels, self.last = 0.0, 0, None

  def add(self, shot, l_small, ab):
    if self.last is not None and self.last[0] == shot and self.last[1].shape == l_small.shape:
      static = np.abs(l_small - self.last[1]) < STATIC_L
      change = np.abs(ab - self.last[2]).sum(-1) * color.AB_SCALE / 2  # the mean over a and b
      self.total += float(change[static].sum())
      self.pixels += int(static.sum())
    self.last = (shot, l_small, ab)

  @property
  def value(self):
    return self.total / self.pixels if self.pixels else 0.0


def _output(path, ext, stream, audio):
  """(the output container, its video stream, its audio stream or None), as the input's."""
  av = _av()
  container_format, codec = OUTPUTS[ext]
  out = av.open(path, 'w', format=container_format)
  video = out.add_stream(codec, rate=stream.average_rate)
  video.width, video.height = stream.width, stream.height
  if codec == 'gif':
    video.pix_fmt = 'rgb8'
  else:  # 4:2:0 needs even sides; odd ones keep full chroma (High 4:4:4, less widely played)
    even = stream.width % 2 == 0 and stream.height % 2 == 0
    video.pix_fmt = 'yuv420p' if even else 'yuv444p'
    video.options = {'crf': '18'} if codec == 'libx264' else {'crf': '24', 'b': '0'}
  video.time_base = stream.time_base
  copied = out.add_stream_from_template(audio) if audio is not None and codec != 'gif' else None
  return out, video, copied


class _Colour:
  """Pass 2 over a video's frames, in order: ab with the shot's embedding, smoothed within the
  shot, recombined with each frame's own L and encoded; the flicker figures on the way."""

  def __init__(self, predictor, shots, temporal, with_stats, out, video, progress):
    self.predictor, self.shots, self.temporal, self.with_stats = (
        predictor,
        shots,
        temporal,
        with_stats,
    )
    self.out, self.video, self.progress = out, video, progress
    self.index, self.previous = 0, None  # (shot, smoothed ab) of the last frame
    self.flicker, self.frame_by_frame = _Flicker(), _Flicker()
    self.psnr, self.colorfulness, self.colorfulness_true = [], [], []
    self.psnr_frame_by_frame = []

  def frames(self, frames):
    if not frames:
      return
    rgbs = [f.to_ndarray(format='rgb24') for f in frames]
    grays, lights = zip(*(colorizer_lib.gray_and_lightness(rgb) for rgb in rgbs))
    shots = [self.shots.of(self.index + i) for i in range(len(frames))]
    abs_ = self.predictor.colorize_batch(grays, self.shots.embeddings[shots])
    own = self.predictor.colorize_batch(grays) if self.with_stats else [None] * len(frames)
    for frame, rgb, gray, l_full, shot, ab, ab_own in zip(
        frames, rgbs, grays, lights, shots, abs_, own
    ):
      if (
          self.previous is not None
          and self.previous[0] == shot
          and self.previous[1].shape == ab.shape
      ):
        ab = self.temporal * self.previous[1] + (1 - self.temporal) * ab
      self.previous = (shot, ab)
      out_rgb = colorizer_lib.recombine(l_full, ab)
      self._measure(shot, gray, l_full, ab, ab_own, rgb, out_rgb)
      encoded = _av().VideoFrame.from_ndarray(out_rgb, format='rgb24')
      encoded.pts, encoded.time_base = frame.pts, frame.time_base
      for packet in self.video.encode(encoded):
        self.out.mux(packet)
      if self.progress is not None:
        self.progress.update(1)
    self.index += len(frames)

  def _measure(self, shot, gray, l_full, ab, ab_own, rgb, out_rgb):
    small = self.predictor.working_images(gray)[0]
    _, l_small = colorizer_lib.gray_and_lightness(np.repeat(small[..., None], 3, -1))
    self.flicker.add(shot, l_small, ab)
    if not self.with_stats:
      return
    self.frame_by_frame.add(shot, l_small, ab_own)
    truth = rgb[None].astype(np.float32) / 255
    made = out_rgb[None].astype(np.float32) / 255
    alone = colorizer_lib.recombine(l_full, ab_own)[None].astype(np.float32) / 255
    self.psnr.append(float(metrics.psnr(made, truth)[0]))
    self.psnr_frame_by_frame.append(float(metrics.psnr(alone, truth)[0]))
    self.colorfulness.append(float(metrics.colorfulness(made)[0]))
    self.colorfulness_true.append(float(metrics.colorfulness(truth)[0]))

  def stats(self):
    out = {
        'frames': self.index,
        'shots': len(self.shots.starts),
        'cuts': self.shots.starts[1:],
        'temporal': self.temporal,
        'flicker': self.flicker.value,
    }
    if self.with_stats:
      out['flicker_frame_by_frame'] = self.frame_by_frame.value
      if max(self.colorfulness_true, default=0) > 1:  # a colour video: how close the colours came
        out.update(
            psnr=float(np.mean(self.psnr)),
            psnr_frame_by_frame=float(np.mean(self.psnr_frame_by_frame)),
            colorfulness=float(np.mean(self.colorfulness)),
            colorfulness_true=float(np.mean(self.colorfulness_true)),
        )
    return out


def render(path, out_path, predictor, shots, temporal=TEMPORAL, with_stats=False, progress=None):
  """Pass 2: the colorized video into `out_path`, the input's audio copied; its stats."""
  ext = os.path.splitext(str(path))[1].lower()
  container, stream, audio = _open(path)
  try:
    out, video, copied = _output(out_path, ext, stream, audio)
    colour = _Colour(predictor, shots, temporal, with_stats, out, video, progress)
    try:
      pending = []
      for frame, packet in _decoded(container, stream, audio):
        if packet is not None:
          if copied is not None:
            packet.stream = copied
            out.mux(packet)
        else:
          pending.append(frame)
          if len(pending) == BATCH:
            colour.frames(pending)
            pending = []
      colour.frames(pending)
      for packet in video.encode(None):
        out.mux(packet)
    finally:
      out.close()
  finally:
    container.close()
  return colour.stats()


def colorize_video(path, out, predictor, temporal=TEMPORAL, with_stats=False, progress=True):
  """Writes the colorized video `path` as `out` (aside, then renamed: a stopped or failed run
  never leaves a cut-off file that looks complete) and returns its stats; SkipVideo if it
  cannot be read. `with_stats` adds what costs a second prediction per frame: the flicker of
  frame-by-frame colorization, and, for a colour input, PSNR and colourfulness against it."""
  from colorflax import reporting

  av = _av()
  container, stream, _ = _open(path)
  total = 2 * stream.frames if stream.frames else None
  container.close()
  aside = out + '.partial'
  name = os.path.basename(str(path))
  bar = reporting.progress_bar(
      total=total, desc=name, unit='frame', disable=not progress, leave=False
  )
  try:
    os.makedirs(os.path.dirname(out), exist_ok=True)
    shots = find_shots(path, predictor, bar)
    stats = render(path, aside, predictor, shots, temporal, with_stats, bar)
    os.replace(aside, out)
  except (av.FFmpegError, OSError) as e:
    if getattr(e, 'errno', None) in files.NO_SPACE + files.NOT_WRITABLE:  # so would the others
      raise UserError(f'cannot write {out}: {files.why(e)}') from None
    raise SkipVideo(f'cannot be written ({_reason(e)})') from None
  finally:
    bar.close()
    if os.path.exists(aside):
      os.remove(aside)
  return stats
