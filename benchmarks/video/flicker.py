"""Flicker and PSNR of colorize's video path on the synthetic clip, by shot embedding and
`--temporal`, with the quickstart model (run the README's main command first). BENCHMARKS.md
quotes its table:

  python benchmarks/video/flicker.py [WORKDIR] [CACHE]   # workdirs/quickstart cache/quickstart
"""

import sys
import tempfile

from colorflax import checkpoints, synthetic, video
from colorflax import colorizer as colorizer_lib


def main(workdir='workdirs/quickstart', cache='cache/quickstart'):
  config = checkpoints.read_config(workdir)
  config.data.cache_dir = cache
  predictor = colorizer_lib.Colorizer(workdir, config)
  with tempfile.TemporaryDirectory() as tmp:
    clip = f'{tmp}/clip.mp4'
    synthetic.video_clip(clip, frames=48, cut=24, width=128, height=96)
    print('shot embedding  temporal  PSNR dB  flicker  (frame by frame: PSNR, flicker)')
    for mode, per_second in (('mean', video.EMBEDDINGS_PER_SECOND), ('first frame', 1e-9)):
      video.EMBEDDINGS_PER_SECOND = per_second  # a sample each 1/rate s; ~0: the first only
      shots = video.find_shots(clip, predictor)
      for temporal in (0.0, 0.3, 0.6, 0.8):
        s = video.render(clip, f'{tmp}/out.mp4', predictor, shots, temporal, with_stats=True)
        print(
            f"{mode:<15} {temporal:>8.1f}  {s['psnr']:7.2f}  {s['flicker']:7.3f}  "
            f"({s['psnr_frame_by_frame']:.2f}, {s['flicker_frame_by_frame']:.3f}); "
            f"cuts {s['cuts']}"
        )


if __name__ == '__main__':
  main(*sys.argv[1:])
