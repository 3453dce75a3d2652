"""`colorflax.demo`, tested in a real browser: Debian's headless Chromium driven by Selenium."""

import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
from PIL import Image

from colorflax import colorizer, demo

sys.path.insert(0, os.path.dirname(__file__))
from test_train import REPO  # noqa: E402

pytest.importorskip('gradio', reason='the demo needs the demo extra (gradio)')
webdriver = pytest.importorskip('selenium.webdriver', reason='the browser test needs selenium')

CHROMIUM, CHROMEDRIVER = shutil.which('chromium'), shutil.which('chromedriver')
TIMEOUT = 180  # seconds for the page to answer: the first request compiles the model


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _serve(work, tmp_path_factory):
  """(url, process, log) of `colorflax.demo` serving `work`, once it answers; its temporary
  files go to `process.tmpdir`."""
  port = _free_port()
  log = open(tmp_path_factory.mktemp('demo') / 'server.log', 'w+')
  tmpdir = tmp_path_factory.mktemp('demo-tmp')
  process = subprocess.Popen(
      [sys.executable, '-m', 'colorflax.demo', f'--workdir={work}', f'--port={port}'],
      cwd=REPO,
      stdout=log,
      stderr=subprocess.STDOUT,
      env={**os.environ, 'TMPDIR': str(tmpdir)},
  )
  process.tmpdir = tmpdir
  url = f'http://127.0.0.1:{port}/'
  deadline = time.time() + TIMEOUT
  while True:
    try:
      urllib.request.urlopen(url, timeout=5).read()
      break
    except OSError:
      log.seek(0)
      assert process.poll() is None, f'the demo exited: {log.read()[-3000:]}'
      assert time.time() < deadline, f'the demo did not answer: {log.read()[-3000:]}'
      time.sleep(1)
  return url, process, log


def _stop(process, log):
  """Stops the server as a user would (kill, a scheduler's SIGTERM), checking that the results
  it offered for download, and the photos uploaded to it, went with it."""
  process.terminate()
  process.wait(30)
  log.seek(0)
  left = [p.name for p in process.tmpdir.glob('colorflax-demo-*')]
  left += ['gradio'] if (process.tmpdir / 'gradio').exists() else []  # copies of the uploads
  assert not left, f'the stopped demo left files behind: {left}\n{log.read()[-3000:]}'
  log.close()


@pytest.fixture(scope='module')
def server(small_run, tmp_path_factory):
  url, process, log = _serve(small_run[0], tmp_path_factory)
  yield url, process, log
  _stop(process, log)


@pytest.fixture(scope='module')
def hints_server(hinted_run, tmp_path_factory):
  url, process, log = _serve(hinted_run[0], tmp_path_factory)
  yield url, process, log
  _stop(process, log)


@pytest.fixture(scope='module')
def browser():
  if not (CHROMIUM and CHROMEDRIVER):
    missing = 'no chromium and chromedriver (Debian: apt-get install chromium chromium-driver)'
    if os.environ.get('COLORFLAX_REQUIRE_BROWSER'):  # .ci/run: the browser test must run there
      pytest.fail(missing)
    pytest.skip(missing)
  from selenium.webdriver.chrome.service import Service

  options = webdriver.ChromeOptions()
  options.binary_location = CHROMIUM
  # Headless, as root in CI, and quiet on a machine with no network beyond loopback.
  for flag in (
      '--headless=new',
      '--no-sandbox',
      '--disable-gpu',
      '--disable-dev-shm-usage',
      '--disable-background-networking',
      '--disable-component-update',
      '--disable-sync',
      '--no-first-run',
      '--window-size=1400,1100',
  ):
    options.add_argument(flag)
  driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
  yield driver
  driver.quit()


def _wait(driver, condition, what):
  from selenium.webdriver.support.ui import WebDriverWait

  try:
    return WebDriverWait(driver, TIMEOUT).until(lambda d: condition(d))
  except Exception:
    raise AssertionError(f'the page never showed {what}') from None


def _upload_and_colorize(driver, url, paths):
  from selenium.webdriver.common.by import By

  driver.get(url)
  field = _wait(
      driver,
      lambda d: d.find_element(By.CSS_SELECTOR, '#photos input[type=file]'),
      'an upload field',
  )
  field.send_keys('\n'.join(str(p) for p in paths))
  uploaded = '#photos a[data-testid=download-link]'  # one link per file, once it is uploaded
  _wait(driver, lambda d: len(d.find_elements(By.CSS_SELECTOR, uploaded)) == len(paths), 'uploads')
  driver.find_element(By.ID, 'colorize').click()
  message = _wait(
      driver,
      lambda d: (t := d.find_element(By.ID, 'message').text) and 'Colorized' in t and t,
      'a result',
  )
  links = [
      a.get_attribute('href')
      for a in driver.find_elements(By.CSS_SELECTOR, '#downloads a[data-testid=download-link]')
      if a.get_attribute('href')
  ]
  return message, links


def _png(url):
  return np.asarray(Image.open(io.BytesIO(urllib.request.urlopen(url, timeout=30).read())))


def _greener(rgb):
  """How much greener than grey: G over the mean of R and B."""
  rgb = np.asarray(rgb, np.float32)
  return rgb[..., 1] - (rgb[..., 0] + rgb[..., 2]) / 2


def test_a_photo_uploaded_in_chromium_comes_back_colorized_at_its_size_and_lightness(
    server, browser, real_photos, tmp_path
):
  url, process, _ = server
  photo = real_photos[3]  # the 480x120 panorama: not the model's square
  message, links = _upload_and_colorize(browser, url, [photo])
  assert 'Colorized 1 of 1' in message
  assert len(links) == 1 and links[0].endswith('_colorized.png'), links
  result = Image.open(io.BytesIO(urllib.request.urlopen(links[0], timeout=30).read()))
  assert result.size == Image.open(photo).size and result.mode == 'RGB'
  # Its lightness is the photo's: the colour is added to the grayscale's L*, never changes it.
  from colorflax import color

  lightness = lambda rgb: np.asarray(color.rgb_to_lab(np.asarray(rgb, np.float32) / 255))[..., 0]
  expected = colorizer.full_res_gray(photo)[1]
  assert np.abs(lightness(result) - expected).max() < 1.0
  assert np.asarray(result).std(axis=-1).mean() > 0.5  # colour, not the grayscale back
  browser.save_screenshot(str(tmp_path / 'demo.png'))  # for a person looking into a failure
  assert process.poll() is None


def test_a_file_that_is_not_an_image_gets_a_message_and_the_server_keeps_serving(
    server, browser, real_photos, tmp_path
):
  url, process, log = server
  text = tmp_path / 'notes.txt'
  text.write_text('not a photo')
  message, links = _upload_and_colorize(browser, url, [text, real_photos[0]])
  assert 'Colorized 1 of 2' in message and 'notes.txt: not an image' in message
  assert len(links) == 1
  log.seek(0)
  assert 'Traceback' not in log.read()
  assert process.poll() is None


def test_the_demo_page_work_reports_each_bad_file_and_keeps_the_good_ones(small_run, tmp_path):
  # The same work as the page's button, without a browser: CMYK and 16-bit files are photos too.
  work, config = small_run
  page = demo.Demo(colorizer.Colorizer(str(work), config), 30_000, str(tmp_path))
  rgb = np.asarray(Image.open(os.path.join(REPO, 'docs', 'reference_example.jpg')))[:160, 160:320]
  Image.fromarray(rgb).convert('CMYK').save(tmp_path / 'cmyk.jpg')
  Image.fromarray((rgb[..., 1].astype(np.uint16) * 257)).save(tmp_path / 'deep.png')
  Image.fromarray(rgb).resize((300, 200)).save(tmp_path / 'big.png')  # over 30,000 pixels
  (tmp_path / 'empty.jpg').write_bytes(b'')
  paths = [str(tmp_path / n) for n in ('cmyk.jpg', 'deep.png', 'big.png', 'empty.jpg')]
  result = page.colorize(paths)
  gallery, slider, downloads, message = (
      result.gallery,
      result.slider,
      result.downloads,
      result.message,
  )
  assert 'Colorized 2 of 4' in message
  assert 'big.png**: too large' in message and 'empty.jpg**: empty file' in message
  assert len(gallery) == 6 and len(downloads) == 2 and slider is not None
  assert Image.open(downloads[1]).size == (160, 160)
  assert Image.open(tmp_path / 'deep.png').mode.startswith('I')  # it was a 16-bit file
  assert not page.hints and result.hint_state['path'] == str(tmp_path / 'cmyk.jpg')
  assert result.paths == paths[:2]
  # A photo picked in the gallery goes into the slider; a model without hints has no panel.
  _, view, slider, out, _, message = page.choose(result.paths[1])
  assert view is None and message == 'deep.png: colorized.'
  assert slider[1].shape == (160, 160, 3) and Image.open(out).size == (160, 160)
  # A model trained without hints has no hints panel, and says so if asked.
  assert 'without colour hints' in page.add_hint(result.hint_state, (3, 3), '#00c000')[-1]


@pytest.mark.parametrize(
    'value, expected',
    [
        ('#2E9E3E', '#2e9e3e'),
        ('#0c0', '#00cc00'),
        ('#00c000ff', '#00c000'),
        ('rgb(0, 192, 0)', '#00c000'),
        ('rgba(255, 0, 12.4, 0.5)', '#ff000c'),
    ],
)
def test_the_colour_pickers_value_becomes_a_hints_rgb(value, expected):
  assert demo.hex_colour(value) == expected


def test_a_colour_that_is_not_one_is_a_message_and_the_hints_stay(
    hinted_run, real_photos, tmp_path
):
  work, config = hinted_run
  page = demo.Demo(colorizer.Colorizer(str(work), config), 10**7, str(tmp_path))
  start = page.colorize([str(real_photos[0])]).hint_state
  state, *_, message = page.add_hint(start, (5, 5), 'greenish')
  assert state == start and message == "not a colour: 'greenish' (expected #rrggbb)"


def test_the_hints_panel_puts_a_point_where_clicked_and_the_colour_follows_it(
    hinted_run, tmp_path, monkeypatch
):
  work, config = hinted_run
  reads = []
  load_rgb = demo.image_io.load_rgb
  monkeypatch.setattr(
      demo.image_io, 'load_rgb', lambda path, *a: reads.append(path) or load_rgb(path, *a)
  )
  page = demo.Demo(colorizer.Colorizer(str(work), config), 10**7, str(tmp_path))
  assert page.hints
  # A photo larger than the panel: the panel shows it at half size, clicks are scaled back.
  sheet = Image.open(os.path.join(REPO, 'docs', 'reference_example.jpg')).convert('RGB')
  photo, small = tmp_path / 'wide.png', tmp_path / 'small.png'
  sheet.crop((0, 160, 800, 360)).resize((2048, 512)).save(photo)  # mid-tones
  sheet.crop((0, 160, 160, 320)).save(small)
  result = page.colorize([str(photo), str(small)])
  assert result.hint_view.shape == (256, 1024, 3)
  assert result.hint_state == {'path': str(photo), 'points': [], 'scale': 0.5}
  plain = np.asarray(Image.open(result.downloads[0]))

  state, view, slider, out, text, message = page.add_hint(result.hint_state, (100, 128), '#00c000')
  assert state['points'] == [{'x': 200, 'y': 256, 'rgb': '#00c000'}]
  assert json.loads(text) == {'points': state['points']}  # what colorize --hints reads
  assert 'with 1 hint.' in message and os.path.basename(out) == 'wide_hinted.png'
  np.testing.assert_array_equal(view[128, 100], [0, 192, 0])  # the dot, in the hint's colour
  hinted = np.asarray(Image.open(out))
  assert hinted.shape == plain.shape == (512, 2048, 3)
  np.testing.assert_array_equal(slider[1], hinted)
  near = np.s_[248:265, 192:209]
  assert _greener(hinted[near]).mean() > _greener(plain[near]).mean() + 2

  state, *_ = page.add_hint(state, (1000, 5), 'rgb(255, 0, 0)')
  assert state['points'][-1] == {'x': 2000, 'y': 10, 'rgb': '#ff0000'}
  # A point off the photo (a click cannot give one; a bad scale could) is refused, not kept.
  kept, *_, message = page.add_hint(state, (1030, 5), '#ff0000')
  assert kept == state and 'point 2 at (2060, 10) is outside the 2048x512 image' in message
  state, *_, message = page.undo_hint(state)
  assert len(state['points']) == 1 and 'with 1 hint.' in message
  state, view, _, out, text, message = page.clear_hints(state)
  assert state['points'] == [] and json.loads(text) == {'points': []} and 'with 0 hints' in message
  np.testing.assert_array_equal(np.asarray(Image.open(out)), plain)  # as without hints
  # Each photo was decoded once for the gallery; the clicks decoded the wide one once more.
  assert reads == [str(photo), str(small), str(photo)]
  # Another photo picked in the gallery: the panel moves to it, at its own scale, with no hints.
  state, view, slider, *_ = page.choose(result.paths[1])
  assert state == {'path': str(small), 'points': [], 'scale': 1.0}
  assert view.shape == slider[1].shape == (160, 160, 3)


def test_a_click_on_a_photo_in_chromium_places_a_hint_and_greens_it_there(
    hints_server, browser, tmp_path
):
  from selenium.webdriver.common.action_chains import ActionChains
  from selenium.webdriver.common.by import By

  url, process, log = hints_server
  photo = tmp_path / 'field.jpg'  # 160 x 160, mid-tones at its centre
  sheet = Image.open(os.path.join(REPO, 'docs', 'reference_example.jpg')).convert('RGB')
  sheet.crop((0, 160, 160, 320)).save(photo, quality=95)
  second = tmp_path / 'roofs.jpg'
  sheet.crop((320, 0, 480, 160)).save(second, quality=95)
  message, links = _upload_and_colorize(browser, url, [photo, second])
  assert 'Colorized 2 of 2' in message
  plain = _png(links[0])
  view = _wait(
      browser, lambda d: d.find_element(By.CSS_SELECTOR, '#hint-view img'), 'the hints panel'
  )
  ActionChains(browser).move_to_element(view).click().perform()  # the photo's centre
  message = _wait(
      browser,
      lambda d: (t := d.find_element(By.ID, 'message').text) and 'with 1 hint' in t and t,
      'the photo colorized with the hint',
  )
  link = _wait(
      browser,
      lambda d: d.find_element(By.CSS_SELECTOR, '#hinted a[data-testid=download-link]'),
      'the hinted PNG',
  ).get_attribute('href')
  hinted = _png(link)
  assert hinted.shape == plain.shape == (160, 160, 3)
  # The point is where the click was, in the picker's default colour.
  text = browser.find_element(By.ID, 'hint-json').text
  [point] = json.loads(text[text.index('{') :])['points']
  assert abs(point['x'] - 80) <= 2 and abs(point['y'] - 80) <= 2, point
  assert point['rgb'] == demo.DEFAULT_HINT_COLOUR
  near = np.s_[72:89, 72:89]
  assert _greener(hinted[near]).mean() > _greener(plain[near]).mean() + 2
  # The second photo's grayscale picked in the gallery: the panel moves to it, with no hints.
  browser.find_element(By.CSS_SELECTOR, '#gallery [aria-label="Thumbnail 4 of 6"]').click()
  _wait(
      browser,
      lambda d: 'roofs.jpg: colorized with 0 hints' in d.find_element(By.ID, 'message').text,
      'the second photo in the hints panel',
  )
  assert '"points": []' in browser.find_element(By.ID, 'hint-json').text
  log.seek(0)
  assert 'Traceback' not in log.read() and process.poll() is None
