"""`colorflax.demo`, tested in a real browser: Debian's headless Chromium driven by Selenium."""

import io
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


@pytest.fixture(scope='module')
def server(small_run, tmp_path_factory):
  work, _ = small_run
  port = _free_port()
  log = open(tmp_path_factory.mktemp('demo') / 'server.log', 'w+')
  process = subprocess.Popen(
      [sys.executable, '-m', 'colorflax.demo', f'--workdir={work}', f'--port={port}'],
      cwd=REPO,
      stdout=log,
      stderr=subprocess.STDOUT,
  )
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
  yield url, process, log
  process.terminate()
  process.wait(30)
  log.close()


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
  gallery, slider, downloads, message = page.colorize(paths)
  assert 'Colorized 2 of 4' in message
  assert 'big.png**: too large' in message and 'empty.jpg**: empty file' in message
  assert len(gallery) == 6 and len(downloads) == 2 and slider is not None
  assert Image.open(downloads[1]).size == (160, 160)
  assert Image.open(tmp_path / 'deep.png').mode.startswith('I')  # it was a 16-bit file
