"""The README's screenshot of `python -m colorflax.demo`: the page in headless Chromium after
colorizing photos.

  python benchmarks/photos/demo_screenshot.py WORKDIR OUT.jpg PHOTO [PHOTO ...]

Needs the demo extra, selenium, and Debian's chromium + chromium-driver.
"""

import io
import socket
import subprocess
import sys
import time
import urllib.request

from PIL import Image
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait


def main(workdir, out, *photos):
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  server = subprocess.Popen(
      [sys.executable, '-m', 'colorflax.demo', f'--workdir={workdir}', f'--port={port}']
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
    for flag in ('--headless=new', '--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage',
                 '--disable-background-networking', '--hide-scrollbars',
                 '--window-size=1400,1250'):  # fmt: skip
      options.add_argument(flag)
    driver = webdriver.Chrome(service=Service('/usr/bin/chromedriver'), options=options)
    wait = WebDriverWait(driver, 300)
    driver.get(url)
    field = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, '#photos input[type=file]'))
    field.send_keys('\n'.join(photos))
    uploaded = '#photos a[data-testid=download-link]'
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, uploaded)) == len(photos))
    driver.find_element(By.ID, 'colorize').click()
    wait.until(lambda d: 'Colorized' in d.find_element(By.ID, 'message').text)
    time.sleep(2)  # the images finish loading
    png = driver.get_screenshot_as_png()
    driver.quit()
    Image.open(io.BytesIO(png)).convert('RGB').save(out, quality=85)  # a .jpg is a quarter
  finally:
    server.terminate()
    server.wait(30)


if __name__ == '__main__':
  main(*sys.argv[1:])
