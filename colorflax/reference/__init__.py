"""The seed model re-written in PyTorch (SPEC §1), with the prototype's state_dict keys.

Imported only by torch-side code (checkpoint import, feature extraction, benchmarks): the JAX
training process never imports torch.
"""

from colorflax.reference.torch_model import EncDec, state_dict_shapes

__all__ = ['EncDec', 'state_dict_shapes']
