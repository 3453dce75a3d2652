import contextlib
import io
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from colorflax import cache_writer, features_cache, inception, precompute_features, signals
from colorflax import sources, synthetic
from colorflax.errors import UserError
from configs import quickstart

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(source, cache_dir, **over):
  c = quickstart.get_config()
  c.data.source = str(source)
  c.data.cache_dir = str(cache_dir)
  c.data.image_size = 32
  c.data.synthetic_images = 12
  c.features.batch_size = 4
  c.features.num_workers = 1
  c.features.calibration_images = 8
  for key, value in over.items():
    section, name = key.split('.')
    c[section][name] = value
  return c


def _colourful(seed, h=40, w=56):
  return synthetic.landscape(seed, max(h, w))[:h, :w]


@pytest.fixture(scope='module')
def weights_pth(tmp_path_factory):
  """A calibrated random Inception-v3 saved as a torchvision state_dict: the offline path."""
  torch.manual_seed(0)
  model = inception._architecture()
  x = inception.preprocess(np.stack([_colourful(i, 32, 32) for i in range(4)]))
  inception.calibrate(model, [x])
  path = tmp_path_factory.mktemp('w') / 'inception.pth'
  torch.save(model.state_dict(), path)
  return str(path)


@pytest.fixture(scope='module')
def mixed_folder(tmp_path_factory):
  root = tmp_path_factory.mktemp('photos') / 'landscape Images' / 'color'
  (root / 'sub dir').mkdir(parents=True)
  Image.fromarray(_colourful(0)).save(root / 'a.jpg', quality=95)
  Image.fromarray(_colourful(1)).save(root / 'sub dir' / 'b.png')
  rgba = np.concatenate([_colourful(2), np.full((40, 56, 1), 128, np.uint8)], -1)
  Image.fromarray(rgba, 'RGBA').save(root / 'c_rgba.png')
  Image.fromarray(_colourful(3)).quantize(64).save(root / 'd_palette.png')
  Image.fromarray(_colourful(4)).convert('CMYK').save(root / 'e_cmyk.jpg')
  # EXIF orientation 6 (rotate 90° clockwise to display): a 40x56 file shown as 56x40.
  exif = Image.Exif()
  exif[0x0112] = 6
  Image.fromarray(_colourful(5)).save(root / 'f_rotated.jpg', exif=exif)
  sixteen = (np.linspace(0, 65535, 40 * 56).reshape(40, 56)).astype(np.uint16)
  Image.fromarray(sixteen).save(root / 'g_16bit.png')
  Image.fromarray(_colourful(6)).convert('L').save(root / 'h_gray.jpg')
  good = io.BytesIO()
  Image.fromarray(_colourful(7)).save(good, format='JPEG')
  (root / 'i_truncated.jpg').write_bytes(good.getvalue()[: len(good.getvalue()) // 2])
  (root / 'j_empty.png').write_bytes(b'')
  (root / 'k_not_an_image.png').write_text('hello, I am text')
  (root / 'notes.txt').write_text('not looked at')
  return root


def test_mixed_folder_counts_reasons_and_rerun_is_byte_identical(
    mixed_folder, weights_pth, tmp_path, capsys
):
  config = _config(mixed_folder, tmp_path / 'cache', **{'features.inception_weights': weights_pth})
  precompute_features.precompute(config, progress=False)
  assert (
      'skipped: 2 grayscale, 1 unreadable, 1 empty file, 1 not an image; '
      'each file and its reason is in '
      f'{tmp_path}/cache/manifest.json'
  ) in capsys.readouterr().out
  cache = features_cache.open_cache(config.data.cache_dir)
  m = cache.manifest
  assert m['num_images'] == 6
  assert m['files'] == [
      'a.jpg',
      'c_rgba.png',
      'd_palette.png',
      'e_cmyk.jpg',
      'f_rotated.jpg',
      'sub dir/b.png',
  ]
  reasons = {s['path']: s['reason'] for s in m['skipped']}
  assert set(reasons) == {
      'g_16bit.png',
      'h_gray.jpg',
      'i_truncated.jpg',
      'j_empty.png',
      'k_not_an_image.png',
  }
  assert reasons['g_16bit.png'].startswith('grayscale') and reasons['h_gray.jpg'].startswith(
      'grayscale'
  )
  assert reasons['j_empty.png'] == 'empty file'
  assert reasons['k_not_an_image.png'] == 'not an image'
  assert reasons['i_truncated.jpg'].startswith('unreadable')
  assert cache.images.shape == (6, 32, 32, 3) and cache.embeddings.shape == (6, 1000)
  for key in (
      'num_images',
      'image_size',
      'resize',
      'embedding_dim',
      'embedding_kind',
      'inception_weights',
      'source',
      'files',
      'skipped',
      'versions',
      'fingerprint',
  ):
    assert key in m
  assert m['inception_weights'] == f'file:{weights_pth}'

  again = _config(mixed_folder, tmp_path / 'again', **{'features.inception_weights': weights_pth})
  precompute_features.precompute(again, progress=False)
  for name in ('images.npy', 'embeddings.npy', 'manifest.json'):
    a = (tmp_path / 'cache' / name).read_bytes()
    b = (tmp_path / 'again' / name).read_bytes()
    assert a == b, name


def test_a_folder_with_linked_folders_lists_each_image_once(tmp_path):
  root = tmp_path / 'photos'
  (root / 'b').mkdir(parents=True)
  for rel in ('a.jpg', 'b/c.png'):
    Image.fromarray(_colourful(0)).save(root / rel)
  (root / 'b' / 'up').symlink_to('..')  # a cycle
  (root / 'alias').symlink_to('b')  # a second way into b/
  (tmp_path / 'more').mkdir()
  Image.fromarray(_colourful(1)).save(tmp_path / 'more' / 'd.png')
  (root / 'more').symlink_to(tmp_path / 'more')  # a folder outside: still followed
  assert sources.FolderSource(str(root)).ids == ['a.jpg', 'alias/c.png', 'more/d.png']


def test_exif_orientation_alpha_and_16bit_decoding(mixed_folder):
  from colorflax import image_io

  rotated = image_io.load_rgb(str(mixed_folder / 'f_rotated.jpg'))
  assert rotated.size == (40, 56)  # (width, height) after applying orientation 6
  rgba = np.asarray(image_io.load_rgb(str(mixed_folder / 'c_rgba.png')), np.float32)
  original = _colourful(2).astype(np.float32)
  np.testing.assert_allclose(rgba, original * 128 / 255 + 255 * 127 / 255, atol=1.5)  # over white
  sixteen = np.asarray(image_io.load_rgb(str(mixed_folder / 'g_16bit.png')))
  assert sixteen.dtype == np.uint8 and sixteen[0, 0, 0] == 0 and sixteen[-1, -1, 0] == 255


def test_cached_embedding_equals_direct_torchvision_call(mixed_folder, weights_pth, tmp_path):
  from torchvision.models import inception_v3

  config = _config(
      mixed_folder,
      tmp_path / 'cache',
      **{'features.inception_weights': weights_pth, 'features.kind': 'logits'},
  )
  precompute_features.precompute(config, progress=False)
  cache = features_cache.open_cache(config.data.cache_dir)
  net = inception_v3(weights=None, aux_logits=True, transform_input=True, init_weights=False)
  net.load_state_dict(torch.load(weights_pth, weights_only=True))
  net = net.eval().to(memory_format=torch.channels_last)  # as precompute runs it (faster on CPU)
  first_batch = np.array(cache.images[: config.features.batch_size])
  with torch.inference_mode():
    direct = net(inception.preprocess(first_batch).to(memory_format=torch.channels_last)).numpy()
  np.testing.assert_allclose(
      np.asarray(cache.embeddings[: len(first_batch)]), direct, rtol=1e-5, atol=1e-5
  )


@pytest.mark.parametrize('kind,dim', [('probs', 1000), ('pool', 2048)])
def test_feature_kinds(weights_pth, tmp_path, kind, dim):
  config = _config(
      'synthetic',
      tmp_path / kind,
      **{
          'features.inception_weights': weights_pth,
          'features.kind': kind,
          'data.synthetic_images': 4,
      },
  )
  precompute_features.precompute(config, progress=False)
  cache = features_cache.open_cache(config.data.cache_dir)
  assert cache.embeddings.shape == (4, dim) and cache.embedding_dim == dim
  if kind == 'probs':
    np.testing.assert_allclose(np.asarray(cache.embeddings).sum(-1), 1.0, rtol=1e-4)
  else:
    assert np.asarray(cache.embeddings).min() >= 0  # post-ReLU average pool


def test_random_weights_are_calibrated_to_a_sane_scale(tmp_path):
  config = _config('synthetic', tmp_path / 'c', **{'features.inception_weights': 'random'})
  precompute_features.precompute(config, progress=False)
  cache = features_cache.open_cache(config.data.cache_dir)
  e = np.asarray(cache.embeddings)
  assert cache.manifest['inception_weights'] == 'random(seed=42)'
  # Uncalibrated, these logits are ~1e11; a pretrained network's are O(1..10).
  assert np.all(np.isfinite(e)) and np.abs(e).max() < 100
  assert 0.1 < e.std() < 20
  assert e.std(0).mean() > 1e-3  # images get different features


def test_a_weights_file_that_is_not_inception_v3_names_the_problem(weights_pth, tmp_path):
  from colorflax.reference import EncDec

  torch.save(EncDec().state_dict(), tmp_path / 'colorizer.pth')  # the wrong model's weights
  good = torch.load(weights_pth, weights_only=True)
  torch.save({**good, 'fc.weight': good['fc.weight'][:10]}, tmp_path / 'ten_classes.pth')
  (tmp_path / 'junk.pth').write_bytes(b'junk')
  for name, problem in (
      ('colorizer.pth', "580 missing keys, 42 unexpected, e.g. no 'AuxLogits.conv0.bn.bias'"),
      ('ten_classes.pth', 'size mismatch for fc.weight'),
      ('junk.pth', ''),
  ):
    with pytest.raises(
        UserError, match=f'{name} is not a torchvision Inception-v3 state_dict \\({problem}'
    ) as e:
      inception.load_model(str(tmp_path / name))
    assert '\n' not in str(e.value) and 'Error(s) in loading' not in str(e.value)


def test_synthetic_source_is_deterministic_and_colourful(tmp_path):
  a = synthetic.landscape(5, 48, seed=1)
  assert np.array_equal(a, synthetic.landscape(5, 48, seed=1))
  assert not np.array_equal(a, synthetic.landscape(6, 48, seed=1))
  from colorflax import image_io

  assert not image_io.is_grayscale(a)


def _tiny_tfds(data_dir):
  import tensorflow_datasets as tfds

  class TinyLandscapes(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version('1.0.0')

    def _info(self):
      return tfds.core.DatasetInfo(
          builder=self,
          features=tfds.features.FeaturesDict(
              {
                  'image': tfds.features.Image(shape=(None, None, 3)),
                  'label': tfds.features.ClassLabel(num_classes=2),
              }
          ),
      )

    def _split_generators(self, dl_manager):
      return {'train': self._generate_examples(5), 'test': self._generate_examples(3, offset=100)}

    def _generate_examples(self, n, offset=0):
      for i in range(n):
        buf = io.BytesIO()  # pre-encoded: encoding arrays would need TensorFlow
        Image.fromarray(_colourful(offset + i, 36, 44)).save(buf, format='PNG')
        yield i, {'image': buf.getvalue(), 'label': i % 2}

  builder = TinyLandscapes(data_dir=str(data_dir), file_format='array_record')
  builder.download_and_prepare()
  return builder.name


def test_tfds_source(weights_pth, tmp_path):
  name = _tiny_tfds(tmp_path / 'tfds')
  config = _config(
      f'tfds:{name}:test',
      tmp_path / 'cache',
      **{'features.inception_weights': weights_pth, 'data.tfds_data_dir': str(tmp_path / 'tfds')},
  )
  precompute_features.precompute(config, progress=False)
  cache = features_cache.open_cache(config.data.cache_dir)
  assert cache.num_images == 3
  assert cache.manifest['files'] == [f'tfds:{name}:test:{i}' for i in range(3)]
  assert 'tensorflow' not in sys.modules


def test_reuse_and_mismatch(weights_pth, tmp_path):
  config = _config(
      'synthetic',
      tmp_path / 'c',
      **{'features.inception_weights': weights_pth, 'data.synthetic_images': 4},
  )
  precompute_features.precompute(config, progress=False)
  before = os.stat(tmp_path / 'c' / 'images.npy').st_mtime_ns
  precompute_features.precompute(config, progress=False)  # same settings: reused
  assert os.stat(tmp_path / 'c' / 'images.npy').st_mtime_ns == before
  config.data.image_size = 16
  with pytest.raises(UserError, match='image_size 32 -> 16'):
    precompute_features.precompute(config, progress=False)
  assert features_cache.open_cache(tmp_path / 'c').image_size == 32  # untouched
  precompute_features.precompute(config, overwrite=True, progress=False)
  assert features_cache.open_cache(tmp_path / 'c').image_size == 16


def test_a_damaged_cache_is_not_reused_and_only_a_caches_own_files_are_replaced(
    weights_pth, tmp_path
):
  config = _config(
      'synthetic',
      tmp_path / 'c',
      **{'features.inception_weights': weights_pth, 'data.synthetic_images': 4},
  )
  precompute_features.precompute(config, progress=False)
  whole = (tmp_path / 'c' / 'images.npy').read_bytes()
  (tmp_path / 'c' / 'images.npy').write_bytes(whole[:1000])  # cut off (a full disk, a bad copy)
  with pytest.raises(UserError, match=r'c is damaged \(.+\); pass --overwrite to rebuild it$'):
    precompute_features.precompute(config, progress=False)  # not "reusing" it
  (tmp_path / 'c' / 'images.npy').unlink()
  with pytest.raises(UserError, match=r'is damaged \(No such file or directory\)'):
    precompute_features.precompute(config, progress=False)
  for manifest, problem in (
      ('[1, 2]', 'is not a cache manifest'),
      ('{"format_version": 1}', "has no valid 'num_images'"),
      ('{"num_ima', 'is unreadable'),
  ):
    (tmp_path / 'c' / 'manifest.json').write_text(manifest)  # edited by hand, cut off
    with pytest.raises(UserError, match=problem):
      features_cache.open_cache(tmp_path / 'c')
    with pytest.raises(UserError, match=problem + '.*pass --overwrite to rebuild it'):
      precompute_features.precompute(config, progress=False)
  precompute_features.precompute(config, overwrite=True, progress=False)  # a damaged one too
  assert (tmp_path / 'c' / 'images.npy').read_bytes() == whole
  # A folder holding anything else (a training run, by mistake) is never replaced.
  (tmp_path / 'c' / 'checkpoints').mkdir()
  with pytest.raises(UserError, match=r"holds files that are not the cache's \(checkpoints\)"):
    precompute_features.precompute(config, overwrite=True, progress=False)
  assert (tmp_path / 'c' / 'checkpoints').is_dir()


def test_calibration_never_meets_a_batch_of_one_image(tmp_path):
  # 5 usable images in batches of 4 (fewer than features.calibration_images): the last
  # calibration batch holds one image, which train-mode BatchNorm refused (the aux head is 1x1).
  config = _config(
      'synthetic',
      tmp_path / 'c',
      **{'data.synthetic_images': 5, 'features.calibration_images': 256},
  )
  precompute_features.precompute(config, progress=False)
  assert features_cache.open_cache(tmp_path / 'c').num_images == 5


def test_a_cache_folder_that_cannot_be_written_says_so(tmp_path, small_disk):
  with small_disk(tmp_path / 'ro', 64) as folder:
    subprocess.run(['mount', '-o', 'remount,ro', str(folder)], check=True)
    with pytest.raises(UserError, match='cannot be written') as info:
      precompute_features.precompute(_config('synthetic', folder / 'c'), progress=False)
  assert 'free some space' not in str(info.value)


def test_a_full_disk_is_one_line_deletes_the_partial_cache_and_keeps_the_old_one(
    weights_pth, tmp_path, small_disk
):
  with small_disk(tmp_path / 'disk', 64) as disk:  # room for the old cache and part of the new
    config = _config(
        'synthetic',
        disk / 'c',
        **{'features.inception_weights': weights_pth, 'data.synthetic_images': 4},
    )
    precompute_features.precompute(config, progress=False)
    before = {f: (disk / 'c' / f).read_bytes() for f in os.listdir(disk / 'c')}
    config.data.synthetic_images = 12
    with pytest.raises(
        UserError,
        match=rf'^cannot write the features cache at {disk}/c: No space left on device '
        r'\(after \d+ of 12 images; the partial cache was deleted\)\. 12 images need about 83 KB: '
        r'free some space or set data.cache_dir elsewhere$',
    ):
      precompute_features.precompute(config, overwrite=True, progress=False)
    assert not os.path.exists(features_cache.incomplete_dir(disk / 'c'))
    assert {
        f: (disk / 'c' / f).read_bytes() for f in os.listdir(disk / 'c')
    } == before  # the cache it was to replace


def _run_cli(*args):
  return subprocess.run(
      [
          sys.executable,
          '-m',
          'colorflax.precompute_features',
          '--config',
          'configs/quickstart.py',
          *args,
      ],
      cwd=REPO,
      capture_output=True,
      text=True,
  )


def test_bad_sources_are_one_line_errors(tmp_path):
  (tmp_path / 'empty').mkdir()
  (tmp_path / 'file').write_text('x')
  cases = [
      (
          [f'--config.data.source={tmp_path}/missing', f'--config.data.cache_dir={tmp_path}/c'],
          'no such folder',
      ),
      (
          [f'--config.data.source={tmp_path}/empty', f'--config.data.cache_dir={tmp_path}/c'],
          'no images',
      ),
      ([f'--config.data.cache_dir={tmp_path}/file'], 'is a file'),
      (
          [
              '--config.data.source=tfds:no_such_dataset_xyz',
              f'--config.data.cache_dir={tmp_path}/c',
          ],
          'tfds build',
      ),
  ]
  for args, fragment in cases:
    r = _run_cli(*args)
    assert r.returncode == 2, (args, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0], r.stderr
  assert (tmp_path / 'file').read_text() == 'x'


def _children(pid):
  """The ids of the processes whose parent is `pid`."""
  out = []
  for entry in filter(str.isdigit, os.listdir('/proc')):
    with contextlib.suppress(OSError), open(f'/proc/{entry}/stat') as f:
      if int(f.read().rsplit(')', 1)[1].split()[1]) == pid:  # after the name: state, parent
        out.append(int(entry))
  return out


def _cmdline(pid):
  with contextlib.suppress(OSError), open(f'/proc/{pid}/cmdline', 'rb') as f:
    return f.read().replace(b'\0', b' ').decode(errors='replace')
  return ''


def test_killed_run_leaves_no_complete_looking_cache(tmp_path, still_running):
  cache = tmp_path / 'cache'
  args = [
      f'--config.data.cache_dir={cache}',
      '--config.data.synthetic_images=400',
      '--config.data.image_size=32',
      '--config.features.batch_size=4',
      '--config.features.num_workers=1',
      '--config.features.calibration_images=4',
  ]
  proc = subprocess.Popen(
      [
          sys.executable,
          '-m',
          'colorflax.precompute_features',
          '--config',
          'configs/quickstart.py',
          *args,
      ],
      cwd=REPO,
      stdout=subprocess.DEVNULL,
      stderr=subprocess.DEVNULL,
  )
  partial = features_cache.incomplete_dir(cache)
  deadline = time.time() + 120
  while time.time() < deadline:  # wait until rows are being written, then kill it hard
    p = os.path.join(partial, 'embeddings.npy')
    if os.path.exists(p) and os.path.getsize(p) > 128 + 4 * 1000 * 8:
      break
    time.sleep(0.1)
  workers = [pid for pid in _children(proc.pid) if 'spawn_main' in _cmdline(pid)]
  assert workers  # the decode worker (features.num_workers = 1)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert os.path.isdir(partial) and not cache.exists()
  # Its decode worker goes too: it used to wait for ever for the next task, holding its memory.
  assert not still_running(workers), [_cmdline(pid) for pid in workers]
  with pytest.raises(UserError, match='interrupted run'):
    features_cache.open_cache(cache)
  r = _run_cli(*args[:1], '--config.data.synthetic_images=8', *args[2:])
  assert r.returncode == 0, r.stderr
  assert features_cache.open_cache(cache).num_images == 8 and not os.path.exists(partial)


# Images in the builds these tests stop part way: enough for a few progress records (one every
# 2 s, at about 14 images/s on 2 cores), few enough that finishing them is quick.
BUILD = 160


def _start_a_build(cache, images=BUILD):
  """(command, process) of a precompute run in its own process group, once it has recorded rows."""
  cmd = [
      sys.executable,
      '-m',
      'colorflax.precompute_features',
      '--config',
      'configs/quickstart.py',
      f'--config.data.cache_dir={cache}',
      f'--config.data.synthetic_images={images}',
      '--config.data.image_size=32',
      '--config.features.batch_size=4',
      '--config.features.num_workers=2',
      '--config.features.calibration_images=4',
  ]
  proc = subprocess.Popen(
      cmd,
      cwd=REPO,
      stdout=subprocess.DEVNULL,
      stderr=subprocess.PIPE,
      text=True,
      start_new_session=True,
  )
  progress = os.path.join(features_cache.incomplete_dir(cache), features_cache.PROGRESS)
  deadline = time.time() + 120
  while time.time() < deadline and not (cache_writer.read_progress(progress) or {}).get('rows'):
    time.sleep(0.1)  # rows have been recorded
  return cmd, proc


@pytest.mark.parametrize(
    'sig,stopped_by',
    [
        (signal.SIGINT, 'interrupted'),
        (signal.SIGTERM, 'stopped by SIGTERM'),
        (signal.SIGHUP, 'stopped by SIGHUP'),
    ],
    ids=['Ctrl-C', 'SIGTERM', 'SIGHUP'],
)
def test_a_stopped_build_keeps_the_images_done_and_the_same_command_continues(
    tmp_path, sig, stopped_by
):
  # Ctrl-C, a closed terminal's SIGHUP and SLURM's SIGTERM reach the whole process group, the
  # decode workers too: only the main process speaks, and it says what it keeps.
  cache = tmp_path / 'cache'
  cmd, proc = _start_a_build(cache)
  os.killpg(proc.pid, sig)
  _, err = proc.communicate(timeout=120)
  last = err.strip().splitlines()[-1]
  stopped = re.fullmatch(
      rf'precompute_features\.py: error: {stopped_by} after (\d+) of {BUILD} images, which are '
      r'kept: '
      r'run the same command again to continue \(or delete .+\.incomplete to start over\)',
      last,
  )
  assert proc.returncode == 128 + sig and stopped, err[-3000:]
  assert 'Traceback' not in err and 'KeyboardInterrupt' not in err, err[-3000:]
  assert 0 < int(stopped.group(1)) < BUILD and not cache.exists()
  r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
  assert r.returncode == 0, r.stderr[-3000:]
  assert f': {stopped.group(1)} of {BUILD} images done' in r.stdout, r.stdout
  cached = features_cache.open_cache(cache)
  assert cached.manifest['files'] == [f'synthetic:{i}' for i in range(BUILD)]
  assert cached.num_images == BUILD and not os.path.exists(features_cache.incomplete_dir(cache))
  assert sorted(os.listdir(cache)) == [
      'embeddings.npy',
      'images.npy',
      'inception_batchnorm.pth',
      'manifest.json',
  ]


def test_a_killed_decode_worker_stops_the_build_with_what_it_keeps(tmp_path):
  # The kernel's OOM killer picks a decode worker. multiprocessing.Pool replaced it, and waited
  # for ever on its task if it held one (CPython issue 22393; here the worker is usually idle,
  # as Inception is the slower side, and the old code finished). Now the build stops at once
  # with one line, keeping its rows, and the same command continues.
  # Enough images that decode tasks remain to be handed out when the worker dies: the pool keeps
  # at most 128 decoded images ahead of Inception, and the first record comes after 2 s (with all
  # of 160 images decoded, the build rightly finishes, having lost nothing).
  cache, images = tmp_path / 'cache', 480
  cmd, proc = _start_a_build(cache, images)
  workers = []
  for pid in filter(str.isdigit, os.listdir('/proc')):
    try:
      with open(f'/proc/{pid}/stat') as f:
        parent = int(f.read().rsplit(')', 1)[1].split()[1])
      with open(f'/proc/{pid}/cmdline', 'rb') as f:
        command = f.read()
    except OSError:  # gone meanwhile
      continue
    if parent == proc.pid and b'spawn_main' in command:
      workers.append(int(pid))
  assert len(workers) == 2
  os.kill(workers[0], signal.SIGKILL)
  try:
    _, err = proc.communicate(timeout=120)
  finally:
    if proc.poll() is None:
      os.killpg(proc.pid, signal.SIGKILL)
  last = err.strip().splitlines()[-1]
  died = re.fullmatch(
      r'precompute_features\.py: error: a decode worker process died after (\d+) of '
      rf'{images} images, which are kept: run the same command again to continue \(.+\)',
      last,
  )
  assert proc.returncode == 2 and died, err[-3000:]
  r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
  assert r.returncode == 0 and f': {died.group(1)} of {images} images done' in r.stdout, r.stderr[
      -3000:
  ]
  assert features_cache.open_cache(cache).num_images == images


def test_an_interrupted_build_continues_into_the_cache_of_an_uninterrupted_one(
    mixed_folder, weights_pth, tmp_path, monkeypatch, capsys
):
  # A folder whose last good image comes after its 5 skipped files. The run stops inside that
  # image's write, after its row reached the file but before a progress record covered it (as a
  # kill would): the next run cuts it off, keeps the skipped files' record, and continues.
  over = {'features.inception_weights': weights_pth, 'features.batch_size': 1}
  whole = precompute_features.precompute(
      _config(mixed_folder, tmp_path / 'whole', **over), progress=False
  )
  config = _config(mixed_folder, tmp_path / 'cache', **over)
  monkeypatch.setattr(features_cache, 'PROGRESS_EVERY_SECONDS', 0.0)
  real_append, calls = cache_writer.CacheWriter.append, []

  def append_then_stop(writer, *args):
    real_append(writer, *args)
    calls.append(writer.images.rows)
    if len(calls) == 6:
      raise KeyboardInterrupt

  monkeypatch.setattr(cache_writer.CacheWriter, 'append', append_then_stop)
  with pytest.raises(signals.Interrupted, match='interrupted after [1-9]'):
    precompute_features.precompute(config, progress=False)
  partial = features_cache.incomplete_dir(config.data.cache_dir)
  recorded = cache_writer.read_progress(os.path.join(partial, features_cache.PROGRESS))
  assert (
      recorded['rows'] == 5 < os.path.getsize(os.path.join(partial, 'images.npy')) // (32 * 32 * 3)
  )
  assert len(recorded['state']['skipped']) == 5
  monkeypatch.setattr(cache_writer.CacheWriter, 'append', real_append)
  capsys.readouterr()
  precompute_features.precompute(config, progress=False)
  assert 'continuing the interrupted build' in capsys.readouterr().out
  for name in ('images.npy', 'embeddings.npy', 'manifest.json', inception.CALIBRATION_FILE):
    if os.path.exists(os.path.join(whole, name)):
      assert (tmp_path / 'cache' / name).read_bytes() == open(
          os.path.join(whole, name), 'rb'
      ).read(), name
  assert features_cache.open_cache(config.data.cache_dir).manifest[
      'skipped'
  ]  # carried over the stop


def test_writer_memory_stays_bounded(tmp_path):
  # 1,500 rows of 256 px (295 MB) streamed through the writer: peak RSS must not follow the data.
  code = f"""
import resource, numpy as np
from colorflax import cache_writer
w = cache_writer.CacheWriter({str(tmp_path / 'big')!r}, 256, 1000)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
img = np.random.default_rng(0).integers(0, 255, (50, 256, 256, 3), dtype=np.uint8)
for i in range(30):
  w.append(img, np.zeros((50, 1000), np.float32), [str(i)] * 50)
w.finish({{'image_size': 256, 'embedding_dim': 1000}})
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base)
"""
  r = subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True, text=True)
  assert r.returncode == 0, r.stderr
  growth_mb = int(r.stdout.strip()) / 1024
  assert growth_mb < 64, growth_mb
  assert np.load(tmp_path / 'big' / 'images.npy', mmap_mode='r').shape == (1500, 256, 256, 3)


def test_too_large_images_and_keeping_grayscale(tmp_path, weights_pth):
  root = tmp_path / 'imgs'
  root.mkdir()
  Image.fromarray(_colourful(0, 64, 64)).save(root / 'big.png')
  Image.fromarray(_colourful(1, 20, 20)).save(root / 'small.png')
  Image.fromarray(_colourful(2, 20, 20)).convert('L').save(root / 'gray.png')
  config = _config(
      root,
      tmp_path / 'c',
      **{
          'features.inception_weights': weights_pth,
          'data.max_image_pixels': 1000,
          'data.skip_grayscale': False,
      },
  )
  precompute_features.precompute(config, progress=False)
  m = features_cache.open_cache(config.data.cache_dir).manifest
  assert m['files'] == ['gray.png', 'small.png']
  assert [s['path'] for s in m['skipped']] == ['big.png']
  assert m['skipped'][0]['reason'].startswith('too large to decode safely')


def test_auto_weights_fall_back_to_random_loudly(tmp_path, monkeypatch, capsys):
  import torchvision.models

  def offline(*args, **kwargs):
    raise OSError('<urlopen error [Errno -2] Name or service not known>')

  monkeypatch.setattr(
      inception,
      'inception_v3',
      lambda weights=None, **kw: offline()
      if weights
      else torchvision.models.inception_v3(weights=None, **kw),
  )
  model, used = inception.load_model('auto', seed=3)
  assert used == 'random(seed=3)'
  assert 'RANDOM weights' in capsys.readouterr().err
  with pytest.raises(UserError, match='could not load torchvision IMAGENET1K_V1'):
    inception.load_model('imagenet')


def test_two_shards_merge_into_the_same_cache_as_one_run(tmp_path, monkeypatch, capsys):
  over = {
      'data.synthetic_images': 20,
      'features.inception_weights': 'random',
      'features.calibration_images': 8,
  }
  single = _config('synthetic', tmp_path / 'single', **over)
  precompute_features.precompute(single, progress=False)
  sharded = _config('synthetic', tmp_path / 'sharded', **over, **{'features.num_shards': 2})
  sharded.features.shard_index = 1  # shards may finish in any order, on any machine
  # Shard 1 (rows 10-19) is stopped inside its second batch's write, after the last record (4
  # rows), and continued from there: its own offsets, and the calibration its stopped run saved.
  monkeypatch.setattr(features_cache, 'PROGRESS_EVERY_SECONDS', 0.0)
  real_append = cache_writer.CacheWriter.append

  def append_then_stop(writer, *args):
    real_append(writer, *args)
    if writer.images.rows == 8:
      raise KeyboardInterrupt

  monkeypatch.setattr(cache_writer.CacheWriter, 'append', append_then_stop)
  with pytest.raises(signals.Interrupted, match='interrupted after 4 of 10 images'):
    precompute_features.precompute(sharded, progress=False)
  monkeypatch.setattr(cache_writer.CacheWriter, 'append', real_append)
  capsys.readouterr()
  precompute_features.precompute(sharded, progress=False)
  assert 'part-00001-of-00002.incomplete: 4 of 10 images done' in capsys.readouterr().out
  with pytest.raises(UserError, match=r'shard\(s\) \[0\] of 2 are not finished'):
    precompute_features.merge(sharded)
  with pytest.raises(UserError, match='has not been merged'):
    features_cache.open_cache(tmp_path / 'sharded')
  sharded.features.shard_index = 0
  precompute_features.precompute(sharded, progress=False)
  precompute_features.merge(sharded)
  a, b = features_cache.open_cache(tmp_path / 'single'), features_cache.open_cache(
      tmp_path / 'sharded'
  )
  assert a.manifest['files'] == b.manifest['files'] and a.num_images == b.num_images == 20
  assert np.array_equal(np.asarray(a.images), np.asarray(b.images))
  np.testing.assert_allclose(
      np.asarray(a.embeddings), np.asarray(b.embeddings), rtol=1e-5, atol=1e-5
  )
  assert a.manifest['fingerprint'] == b.manifest['fingerprint']
  assert (tmp_path / 'single' / inception.CALIBRATION_FILE).read_bytes() == (
      tmp_path / 'sharded' / inception.CALIBRATION_FILE
  ).read_bytes()
  assert not os.path.exists(features_cache.parts_root(tmp_path / 'sharded'))
