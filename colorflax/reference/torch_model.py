"""`enc_dec`, the PyTorch prototype's model, rebuilt from SPEC §1.

Each block is an `nn.Sequential`, so parameter keys carry the layer's index inside its block
(`enc2.1.weight`, `enc4.7.running_var`, ...), exactly as the prototype's checkpoints do.
"""

import torch
from torch import nn


def _conv(cin, cout, k):
  return nn.Conv2d(cin, cout, k, padding=k // 2)


class EncDec(nn.Module):
  """NCHW: forward(L (B,1,H,W) in [0,1], embedding (B,D)) -> ab/128 (B,2,H,W)."""

  def __init__(self, embedding_dim: int = 1000):
    super().__init__()
    self.enc1 = nn.Sequential(_conv(1, 128, 3), nn.LeakyReLU(0.1))
    self.enc2 = nn.Sequential(
        nn.MaxPool2d(2),
        _conv(128, 128, 5),
        nn.ReLU(),
        _conv(128, 128, 3),
        nn.ReLU(),
        nn.BatchNorm2d(128),
    )
    self.enc3 = nn.Sequential(
        nn.MaxPool2d(2), _conv(128, 256, 5), nn.ReLU(), _conv(256, 256, 3), nn.ReLU()
    )
    self.enc4 = nn.Sequential(
        nn.MaxPool2d(2),
        _conv(256, 256, 5),
        nn.ReLU(),
        _conv(256, 256, 3),
        nn.ReLU(),
        _conv(256, 256, 3),
        nn.ReLU(),
        nn.BatchNorm2d(256),
    )
    self.dec1 = nn.Sequential(
        _conv(256 + embedding_dim, 128, 3),
        nn.ReLU(),
        _conv(128, 64, 3),
        nn.LeakyReLU(0.1),
        nn.Upsample(scale_factor=2, mode='nearest'),
    )
    self.dec2 = nn.Sequential(
        _conv(64 + 256, 128, 3), nn.ReLU(), nn.Upsample(scale_factor=2, mode='nearest')
    )
    self.dec3 = nn.Sequential(
        _conv(128 + 128, 64, 5),
        nn.ReLU(),
        _conv(64, 64, 3),
        nn.ReLU(),
        _conv(64, 32, 3),
        nn.ReLU(),
        _conv(32, 2, 3),
        nn.LeakyReLU(0.1),
        nn.Upsample(scale_factor=2, mode='nearest'),
    )
    self.dec4 = nn.Sequential(_conv(2, 2, 3), nn.Tanh())

  def forward(self, L: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
    enc1 = self.enc1(L)  # not used as a skip, as in the prototype
    enc2 = self.enc2(enc1)
    enc3 = self.enc3(enc2)
    enc4 = self.enc4(enc3)
    e = embedding[:, :, None, None].expand(-1, -1, enc4.shape[2], enc4.shape[3])
    x = self.dec1(torch.cat([enc4, e], dim=1))
    x = self.dec2(torch.cat([x, enc3], dim=1))
    x = self.dec3(torch.cat([x, enc2], dim=1))
    return self.dec4(x)


def state_dict_shapes(embedding_dim: int = 1000) -> dict:
  """{key: shape} of the prototype's state_dict, without allocating its weights."""
  with torch.device('meta'):
    model = EncDec(embedding_dim)
  return {k: tuple(v.shape) for k, v in model.state_dict().items()}
