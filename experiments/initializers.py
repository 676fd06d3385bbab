"""Weight initialisations a run can choose (``--init``): the models' own, or PyTorch's defaults.

* ``flax``: what :mod:`experiments.models` builds: Flax's ``lecun_normal`` for Linear kernels,
  He-normal fan-out for convolution kernels (as torchvision's ResNets), zero biases.
* ``torch``: PyTorch's defaults for ``nn.Linear`` and ``nn.Conv2d``, which the FlipOut
  authors' models use: ``kaiming_uniform_(a=sqrt(5))`` for the weight, i.e.
  ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``, and the same bound for the bias. ``fan_in`` is a
  Linear layer's input width, a convolution's ``kh * kw * in_channels``. BatchNorm is the
  same in both (scale 1, offset 0).

The flip counts FlipOut ranks by depend on the ratio of the gradient noise to the weights'
size, so the initialisation is part of a faithful reproduction (He fan-out convolutions start
~2.45x wider than PyTorch's on a 3x3 VGG layer).
"""

from __future__ import annotations

import math

import jax
from flax import nnx

INITS: tuple[str, ...] = ("flax", "torch")


def apply_init(model: nnx.Module, init: str, seed: int) -> None:
  """Re-draws the Linear and Conv parameters of ``model`` in place for ``init``.

  ``flax`` leaves the model as built. ``torch`` replaces every ``nnx.Linear`` and
  ``nnx.Conv`` kernel and bias by uniform draws in ``[-1/sqrt(fan_in), 1/sqrt(fan_in))``,
  keyed by ``seed`` and the layer's position in the graph (deterministic, traceable: it
  runs inside the run's compiled initialiser).

  Args:
    model: a model of :mod:`experiments.models`.
    init: one of :data:`INITS`.
    seed: the run's seed.

  Raises:
    ValueError: ``init`` is not one of :data:`INITS`.
  """
  if init not in INITS:
    raise ValueError(f"init must be one of {', '.join(INITS)}; got {init!r}")
  if init == "flax":
    return
  key = jax.random.key(seed)
  layers = [node for _, node in nnx.iter_graph(model) if isinstance(node, (nnx.Linear, nnx.Conv))]
  for index, layer in enumerate(layers):
    kernel = layer.kernel[...]
    bound = 1.0 / math.sqrt(math.prod(kernel.shape[:-1]))
    kernel_key, bias_key = jax.random.split(jax.random.fold_in(key, index))
    layer.kernel[...] = _uniform(kernel_key, kernel, bound)
    if layer.bias is not None:
      layer.bias[...] = _uniform(bias_key, layer.bias[...], bound)


def _uniform(key: jax.Array, like: jax.Array, bound: float) -> jax.Array:
  return jax.random.uniform(key, like.shape, like.dtype, minval=-bound, maxval=bound)
