"""The embedded default dataset: deterministic procedural landscapes.

Each image is a function of (seed, index, size) alone. Colour is predictable from what a
grayscale image still shows — brightness, texture and position — as in real landscapes:
smooth bright gradients at the top are sky (blue by day, orange-violet at sunset), a bright
disc is the sun, jagged mid-tone ridges are mountains with white snow above a snowline,
strongly textured dark regions are forest, finely textured mid-tones are grass,
horizontal ripples below the horizon are water and the smooth pale strip beside it is sand.
A colorizer can therefore beat the grayscale baseline on it, measurably and quickly.
"""

import numpy as np

SKY_DAY = (np.array([0.16, 0.38, 0.78]), np.array([0.70, 0.84, 0.96]))  # zenith, horizon
SKY_SUNSET = (np.array([0.30, 0.22, 0.50]), np.array([0.98, 0.58, 0.26]))
SUN = np.array([1.0, 0.95, 0.70])
MOUNTAIN = np.array([0.42, 0.40, 0.52])
SNOW = np.array([0.95, 0.96, 1.0])
FOREST = np.array([0.10, 0.30, 0.12])
GRASS = np.array([0.42, 0.64, 0.20])
WATER = np.array([0.10, 0.32, 0.55])
SAND = np.array([0.86, 0.78, 0.56])


def _smooth(t):
  return t * t * (3.0 - 2.0 * t)


def value_noise(rng, h, w, cells):
  """Smooth random field in [0, 1] of shape (h, w) with about `cells` features across."""
  grid = rng.random((cells + 1, cells + 1))
  y = np.linspace(0, cells, h, endpoint=False)
  x = np.linspace(0, cells, w, endpoint=False)
  iy, ix = y.astype(int), x.astype(int)
  ty, tx = _smooth(y - iy)[:, None], _smooth(x - ix)[None, :]
  a, b = grid[iy][:, ix], grid[iy][:, ix + 1]
  c, d = grid[iy + 1][:, ix], grid[iy + 1][:, ix + 1]
  return (a * (1 - tx) + b * tx) * (1 - ty) + (c * (1 - tx) + d * tx) * ty


def fractal_noise(rng, h, w, cells=4, octaves=4):
  total, norm, amp = np.zeros((h, w)), 0.0, 1.0
  for o in range(octaves):
    total += amp * value_noise(rng, h, w, cells * 2**o)
    norm += amp
    amp *= 0.5
  return total / norm


def ridge(rng, w, cells, octaves=5):
  """A 1-D fractal profile in [0, 1] (a mountain skyline)."""
  return fractal_noise(rng, 1, w, cells, octaves)[0]


def landscape(index: int, size: int, seed: int = 0) -> np.ndarray:
  """The `index`-th synthetic landscape, uint8 (size, size, 3)."""
  rng = np.random.default_rng([seed, index])
  s = size
  yy = (np.arange(s)[:, None] + 0.5) / s * np.ones((1, s))
  xx = (np.arange(s)[None, :] + 0.5) / s * np.ones((s, 1))
  img = np.zeros((s, s, 3))

  # Sky: a vertical gradient; sunsets are warm near the horizon.
  horizon = rng.uniform(0.42, 0.62)
  sunset = rng.random() < 0.3
  zenith, low = SKY_SUNSET if sunset else SKY_DAY
  t = np.clip(yy / horizon, 0, 1)[..., None] ** 1.5
  img[:] = zenith * (1 - t) + low * t

  # Sun with a glow, low in the sky at sunset.
  sy = rng.uniform(0.55, 0.9) * horizon if sunset else rng.uniform(0.08, 0.4) * horizon
  sx, radius = rng.uniform(0.1, 0.9), rng.uniform(0.035, 0.07)
  dist = np.hypot(yy - sy, xx - sx)
  glow = np.exp(-np.maximum(dist - radius, 0) / (radius * 2.5))[..., None] * 0.5
  img = img * (1 - glow) + SUN * glow
  img[dist < radius] = SUN

  # Clouds by day: soft white patches.
  if not sunset:
    cloud = np.clip((fractal_noise(rng, s, s, 3, 4) - rng.uniform(0.55, 0.7)) * 4, 0, 1)
    cloud *= yy < horizon * 0.8
    img = img * (1 - cloud[..., None]) + np.array([0.97, 0.97, 0.98]) * cloud[..., None]

  # Mountains: one or two ridges rising from the horizon, snow above a snowline.
  for layer in range(rng.integers(1, 3)):
    height = rng.uniform(0.25, 0.6) * horizon * (1.0 - 0.35 * layer)
    r = ridge(rng, s, rng.integers(2, 5))
    r = (r - r.min()) / max(r.max() - r.min(), 1e-6)
    profile = horizon - height * (0.15 + 0.85 * r)
    mask = yy > profile[None, :]
    shade = 0.85 + 0.3 * fractal_noise(rng, s, s, 8, 3)
    rel = np.clip((yy - profile[None, :]) / height, 0, 1)
    rock = MOUNTAIN * (1.0 - 0.25 * layer) * shade[..., None] * (0.8 + 0.2 * rel[..., None])
    snow = mask & (yy < horizon - height * rng.uniform(0.55, 0.8))  # an absolute snowline
    colour = np.where(snow[..., None], SNOW * (0.92 + 0.08 * shade[..., None]), rock)
    img = np.where(mask[..., None], colour, img)

  # Ground: water right below the horizon (sometimes), a sand strip, then grass and forest.
  below = yy >= horizon
  depth = np.clip((yy - horizon) / (1 - horizon), 0, 1)
  ground = GRASS * (0.75 + 0.5 * fractal_noise(rng, s, s, 16, 3))[..., None]
  forest_mask = fractal_noise(rng, s, s, 3, 3) > rng.uniform(0.45, 0.6)
  forest = FOREST * (0.5 + 1.0 * value_noise(rng, s, s, max(8, s // 3)))[..., None]
  ground = np.where(forest_mask[..., None], forest, ground)
  if rng.random() < 0.6:
    water_end = rng.uniform(0.2, 0.5)
    ripples = 0.85 + 0.15 * np.sin(yy * s * 1.7 + 3 * value_noise(rng, s, s, 6))
    water = (WATER * (0.8 + 0.4 * (1 - depth))[..., None]) * ripples[..., None]
    sand_end = water_end + rng.uniform(0.05, 0.12)
    ground = np.where(
        (depth < sand_end)[..., None],
        SAND * (0.95 + 0.05 * value_noise(rng, s, s, 20))[..., None],
        ground,
    )
    ground = np.where((depth < water_end)[..., None], water, ground)
  img = np.where(below[..., None], ground, img)

  return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)


def video_frames(frames=24, cut=12, width=96, height=64):
  """A clip of synthetic landscapes, uint8 (frames, height, width, 3): a slow pan across one
  landscape, then, from frame `cut` on, a slow pan down another (the cut a detector must find).
  Each frame is a window over three quarters of the scene, squashed to width x height."""
  from PIL import Image

  size = 4 * max(width, height)
  window = 3 * size // 4
  out = []
  for i in range(frames):
    first = i < cut
    scene = landscape(5 if first else 9, size)
    step = i if first else i - cut
    x, y = (2 * step, size // 8) if first else (size // 8, 2 * step)  # two pixels a frame
    crop = Image.fromarray(scene[y : y + window, x : x + window])
    out.append(np.asarray(crop.resize((width, height), Image.Resampling.BOX)))
  return np.stack(out)


def video_clip(path, frames=24, cut=12, fps=12, width=96, height=64, tone=440.0):
  """`video_frames` written as an H.264 mp4 (PyAV) with a `tone` Hz sine as its mono AAC
  audio, as long as the video: the clip the video path is tested and measured on."""
  import av

  clip = video_frames(frames, cut, width, height)
  with av.open(str(path), 'w') as out:
    video = out.add_stream('libx264', rate=fps)
    video.width, video.height, video.pix_fmt = width, height, 'yuv420p'
    video.options = {'crf': '12'}
    audio = out.add_stream('aac', rate=44100)
    audio.layout = 'mono'
    for i, rgb in enumerate(clip):
      frame = av.VideoFrame.from_ndarray(rgb, format='rgb24')
      frame.pts = i
      out.mux(video.encode(frame))
    out.mux(video.encode(None))
    t = np.arange(round(44100 * frames / fps)) / 44100
    wave = (0.3 * np.sin(2 * np.pi * tone * t)).astype(np.float32)
    for start in range(0, len(wave), 1024):
      chunk = av.AudioFrame.from_ndarray(
          wave[None, start : start + 1024], format='fltp', layout='mono'
      )
      chunk.sample_rate, chunk.pts = 44100, start
      out.mux(audio.encode(chunk))
    out.mux(audio.encode(None))
  return clip
