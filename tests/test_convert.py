import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch

from colorflax import checkpoints
from colorflax import convert
from colorflax.errors import UserError
from colorflax.reference import EncDec

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _random_seed_model(seed=0, embedding_dim=1000):
  torch.manual_seed(seed)
  model = EncDec(embedding_dim)
  with torch.no_grad():  # non-trivial BatchNorm parameters and running statistics
    for bn in (model.enc2[5], model.enc4[7]):
      bn.weight.uniform_(0.5, 1.5)
      bn.bias.uniform_(-0.5, 0.5)
      bn.running_mean.uniform_(-0.2, 0.2)
      bn.running_var.uniform_(0.5, 2.0)
  return model.eval()


@pytest.fixture(scope='module')
def seed_pth(tmp_path_factory):
  path = tmp_path_factory.mktemp('seed') / 'seed.pth'
  torch.save(_random_seed_model().state_dict(), path)
  return str(path)


@pytest.mark.parametrize('hw', [(256, 256), (64, 96)])
def test_imported_checkpoint_matches_pytorch(seed_pth, hw):
  torch_model = EncDec()
  torch_model.load_state_dict(torch.load(seed_pth, weights_only=True))
  torch_model.eval()
  model, variables = convert.load_torch_checkpoint(seed_pth)
  rng = np.random.default_rng(hash(hw) % 2**32)
  L = rng.random((2, *hw, 1), dtype=np.float32)
  e = rng.normal(size=(2, 1000)).astype(np.float32) * 3
  with torch.inference_mode():
    ref = torch_model(torch.from_numpy(L.transpose(0, 3, 1, 2)), torch.from_numpy(e)).numpy()
  ours = np.asarray(jax.jit(lambda v, l, x: model.apply(v, l, x, train=False))(variables, L, e))
  ref = ref.transpose(0, 2, 3, 1)
  assert ours.shape == ref.shape == (2, *hw, 2)
  assert np.abs(ref).max() > 0.05  # the comparison is not between two near-zero outputs
  assert np.abs(ours - ref).max() <= 1e-4


def test_pooled_embedding_checkpoint(tmp_path):
  path = tmp_path / 'pool.pth'
  torch.save(_random_seed_model(embedding_dim=2048).state_dict(), path)
  model, variables = convert.load_torch_checkpoint(path)
  assert model.embedding_dim == 2048


def test_dataparallel_prefix_is_accepted(tmp_path):
  path = tmp_path / 'dp.pth'
  sd = {'module.' + k: v for k, v in _random_seed_model().state_dict().items()}
  torch.save({'state_dict': sd}, path)
  _, variables = convert.load_torch_checkpoint(path)
  assert variables['params']['enc1_0']['kernel'].shape == (3, 3, 1, 128)


@pytest.mark.parametrize(
    'mutate,message',
    [
        (lambda sd: sd.pop('enc4.7.running_var'), "missing key 'enc4.7.running_var'"),
        (
            lambda sd: sd.__setitem__('dec9.0.weight', torch.zeros(1)),
            "unexpected key 'dec9.0.weight'",
        ),
        (
            lambda sd: sd.__setitem__('enc2.3.weight', torch.zeros(128, 128, 5, 5)),
            "'enc2.3.weight' has shape",
        ),
        (lambda sd: sd.pop('dec1.0.weight'), "no 'dec1.0.weight'"),
    ],
)
def test_wrong_state_dict_names_the_first_problem(tmp_path, mutate, message):
  sd = _random_seed_model().state_dict()
  mutate(sd)
  path = tmp_path / 'bad.pth'
  torch.save(sd, path)
  with pytest.raises(UserError, match=message.replace('(', r'\(')):
    convert.load_torch_checkpoint(path)


def test_not_a_torch_file(tmp_path):
  path = tmp_path / 'junk.pth'
  path.write_bytes(b'not a checkpoint at all')
  with pytest.raises(UserError, match='not a loadable PyTorch state_dict'):
    convert.load_torch_checkpoint(path)
  with pytest.raises(UserError, match='no such checkpoint file'):
    convert.load_torch_checkpoint(tmp_path / 'missing.pth')
  with pytest.raises(UserError, match='is a folder; give the PyTorch checkpoint file'):
    convert.load_torch_checkpoint(tmp_path)


def test_convert_cli_writes_a_restorable_orbax_checkpoint(seed_pth, tmp_path):
  workdir = tmp_path / 'work'
  cmd = [sys.executable, '-m', 'colorflax.convert_torch', seed_pth, '--workdir', str(workdir)]
  result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
  assert result.returncode == 0, result.stderr
  variables, meta, step = checkpoints.restore_model(workdir, 'latest')
  assert step == 0 and meta['source'] == 'convert_torch'
  _, expected = convert.load_torch_checkpoint(seed_pth)
  for a, b in zip(jax.tree_util.tree_leaves(expected), jax.tree_util.tree_leaves(variables)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  config = checkpoints.read_config(workdir)
  assert config.features.inception_weights == 'imagenet' and config.features.kind == 'logits'
  # A second conversion into the same workdir refuses to clobber it.
  again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
  assert again.returncode == 2 and '--overwrite' in again.stderr
  assert len(again.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize('polyphase_dec3', [False, True])
def test_training_gradients_match_pytorch(polyphase_dec3):
  """One training-mode backward pass (batch statistics, MSE on ab) gives PyTorch's gradients,
  with dec3_0 in either form; the reshape max pool routes gradients as PyTorch's max_pool2d
  does."""
  torch_model = _random_seed_model(seed=1).train()
  rng = np.random.default_rng(7)
  L = rng.random((2, 32, 48, 1), dtype=np.float32)
  e = rng.normal(size=(2, 1000)).astype(np.float32)
  target = rng.uniform(-1, 1, (2, 32, 48, 2)).astype(np.float32)
  loss = torch.nn.functional.mse_loss(
      torch_model(torch.from_numpy(L.transpose(0, 3, 1, 2)), torch.from_numpy(e)),
      torch.from_numpy(target.transpose(0, 3, 1, 2)),
  )
  loss.backward()
  grads_sd = dict(torch_model.state_dict())
  grads_sd.update({name: p.grad for name, p in torch_model.named_parameters()})
  _, ref = convert.torch_to_flax(grads_sd)

  _, variables = convert.torch_to_flax(torch_model.state_dict())
  model = convert.model_lib.Colorizer(polyphase_dec3=polyphase_dec3)

  def loss_fn(params):
    pred, _ = model.apply(
        {'params': params, 'batch_stats': variables['batch_stats']},
        L,
        e,
        train=True,
        mutable=['batch_stats'],
    )
    return jax.numpy.mean(jax.numpy.square(pred - target))

  value, grads = jax.jit(jax.value_and_grad(loss_fn))(variables['params'])
  assert abs(float(value) - loss.item()) <= 1e-5
  for path, ours in jax.tree_util.tree_leaves_with_path(grads):
    want = ref['params'][path[0].key][path[1].key]
    scale = np.abs(want).max()
    assert scale > 0, path
    np.testing.assert_allclose(np.asarray(ours), want, atol=2e-4 * scale, rtol=0, err_msg=str(path))
