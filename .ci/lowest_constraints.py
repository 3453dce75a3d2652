"""Prints pip constraints pinning every dependency to the lower bound pyproject.toml declares.

    python3 .ci/lowest_constraints.py > /tmp/lowest.txt
    pip install -c /tmp/lowest.txt -e '.[features,test]'

.ci/run tests part of the suite on them. The whole suite passed on them on 2026-11-29 (199 passed;
the real-XLA-flag test skips, as colorflax sets its flag only on jaxlib >= 0.10; 27 min on the
2-core CPU). What set today's bounds: tensorboardX 2.6 needs protobuf < 4 (grain: >= 5.28.3);
tensorflow-datasets 4.9.8-4.9.9 fail on the protobuf 7 pip pairs them with, and 4.9.7 imports
TensorFlow to build a dataset; jax 0.7, flax 0.11 and grain 0.2.15 need Python 3.11.
torch and torchvision are left out: only 2.14.1 / 0.29.1 can be installed on the CI machine.
"""

import os
import re
import sys
import tomllib

UNTESTED = {'torch', 'torchvision'}
EXTRAS = ('features', 'tfds', 'video', 'test')  # not cuda/tpu: those are jax itself, with plugins

with open(
    os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'pyproject.toml'), 'rb'
) as f:
  project = tomllib.load(f)['project']
pins = {}
for req in project['dependencies'] + [
    r for e in EXTRAS for r in project['optional-dependencies'][e]
]:
  match = re.fullmatch(r'([A-Za-z0-9_.-]+)>=([0-9.]+)', req.replace(' ', ''))
  if not match:
    sys.exit(f'lowest_constraints.py: {req!r} has no plain lower bound (NAME>=VERSION) to test')
  name, version = match[1].lower(), match[2]
  if pins.setdefault(name, version) != version:
    sys.exit(f'lowest_constraints.py: {name} has two lower bounds, {pins[name]} and {version}')
for name, version in pins.items():
  if name not in UNTESTED:
    print(f'{name}=={version}')
