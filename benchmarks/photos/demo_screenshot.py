"""The README's screenshots of `python -m colorflax.demo`: the page in headless Chromium after
colorizing photos, and with --hint, the hints panel of a model trained with hints after clicks on
the first photo.

  python benchmarks/photos/demo_screenshot.py WORKDIR OUT.jpg PHOTO [PHOTO ...]
  python benchmarks/photos/demo_screenshot.py HINTS_WORKDIR OUT.jpg PHOTO --hint X,Y [--hint X,Y]

Each --hint is a point of the first photo, in its pixels, clicked in the colour the photo (a
colour one) has there: a user who knows the colour of that spot. Then OUT.jpg shows the hints
panel only. Needs the demo extra, selenium, and Debian's chromium + chromium-driver.
"""

import argparse
import io
import socket
import subprocess
import sys
import time
import urllib.request

from PIL import Image
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait


def pick_colour(driver, hex_colour):
  """Sets the hints panel's colour picker to `hex_colour` (#rrggbb) as a user would: its dialog's
  hex field, then the dialog closed."""
  driver.find_element(By.CSS_SELECTOR, '#hint-colour button.dialog-button').click()
  field = driver.find_element(By.CSS_SELECTOR, '#hint-colour input[type=text]')
  field.send_keys(Keys.CONTROL, 'a')
  field.send_keys(hex_colour, Keys.ENTER)
  driver.find_element(By.CSS_SELECTOR, '#hint-colour span[data-testid=block-info]').click()


def click_hint(driver, x, y, width, height):
  """A click on the hints panel's photo at (x, y) of a width x height photo."""
  view = driver.find_element(By.CSS_SELECTOR, '#hint-view img')
  shown = view.size
  dx = (x + 0.5) / width * shown['width'] - shown['width'] / 2  # from the element's centre
  dy = (y + 0.5) / height * shown['height'] - shown['height'] / 2
  ActionChains(driver).move_to_element_with_offset(view, round(dx), round(dy)).click().perform()


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('workdir')
  parser.add_argument('out')
  parser.add_argument('photos', nargs='+')
  parser.add_argument('--hint', action='append', default=[], help='X,Y of the first photo')
  args = parser.parse_args()
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  server = subprocess.Popen(
      [sys.executable, '-m', 'colorflax.demo', f'--workdir={args.workdir}', f'--port={port}']
  )
  url = f'http://127.0.0.1:{port}/'
  try:
    for _ in range(180):
      try:
        urllib.request.urlopen(url, timeout=5)
        break
      except OSError:
        time.sleep(1)
    options = webdriver.ChromeOptions()
    options.binary_location = '/usr/bin/chromium'
    height = 2600 if args.hint else 1250  # the hints panel is below the gallery
    for flag in ('--headless=new', '--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage',
                 '--disable-background-networking', '--hide-scrollbars',
                 f'--window-size=1400,{height}'):  # fmt: skip
      options.add_argument(flag)
    driver = webdriver.Chrome(service=Service('/usr/bin/chromedriver'), options=options)
    wait = WebDriverWait(driver, 300)
    driver.get(url)
    field = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, '#photos input[type=file]'))
    field.send_keys('\n'.join(args.photos))
    uploaded = '#photos a[data-testid=download-link]'
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, uploaded)) == len(args.photos))
    driver.find_element(By.ID, 'colorize').click()
    wait.until(lambda d: 'Colorized' in d.find_element(By.ID, 'message').text)
    region = None
    if args.hint:
      photo = Image.open(args.photos[0]).convert('RGB')
      wait.until(lambda d: d.find_element(By.CSS_SELECTOR, '#hint-view img'))
      for i, point in enumerate(args.hint, 1):
        x, y = (int(v) for v in point.split(','))
        pick_colour(driver, '#%02x%02x%02x' % photo.getpixel((x, y)))
        click_hint(driver, x, y, *photo.size)
        with_n = f'with {i} hint'
        wait.until(lambda d, w=with_n: w in d.find_element(By.ID, 'message').text)
      # The panel: from its colour picker's top to the photo's or the JSON's bottom.
      tops = [driver.find_element(By.ID, e).rect for e in ('hint-colour', 'hint-view', 'hint-json')]
      top = min(r['y'] for r in tops) - 100  # its heading
      bottom = max(r['y'] + r['height'] for r in tops) + 20
      region = (0, max(0, int(top)), 1400, int(bottom))
    time.sleep(2)  # the images finish loading
    png = driver.get_screenshot_as_png()
    driver.quit()
    shot = Image.open(io.BytesIO(png)).convert('RGB')
    (shot.crop(region) if region else shot).save(args.out, quality=85)  # a .jpg is a quarter
  finally:
    server.terminate()
    server.wait(30)


if __name__ == '__main__':
  main()
