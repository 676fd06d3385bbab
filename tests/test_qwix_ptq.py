"""Tests of int8 post-training quantization with qwix (experiments/qwix_ptq.py)."""

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from sklearn.datasets import load_digits

from experiments import qwix_ptq

_TRAIN_STEPS = 200
_BATCH = 64


class _TinyCnn(nnx.Module):
  """Conv+BatchNorm twice and a dense head, for 8x8x1 digits."""

  def __init__(self, rngs: nnx.Rngs):
    self.conv1 = nnx.Conv(1, 8, (3, 3), rngs=rngs)
    self.bn1 = nnx.BatchNorm(8, rngs=rngs)
    self.conv2 = nnx.Conv(8, 16, (3, 3), strides=(2, 2), rngs=rngs)
    self.bn2 = nnx.BatchNorm(16, rngs=rngs)
    self.head = nnx.Linear(16 * 4 * 4, 10, rngs=rngs)

  def __call__(self, images):
    hidden = nnx.relu(self.bn1(self.conv1(images)))
    hidden = nnx.relu(self.bn2(self.conv2(hidden)))
    return self.head(hidden.reshape(hidden.shape[0], -1))


def _digits():
  """Normalized (N, 8, 8, 1) float32 images, int labels; seeded 80/20 split."""
  digits = load_digits()
  images = digits.images.astype(np.float32)[..., None] / 16.0
  images = (images - images.mean()) / images.std()
  order = np.random.default_rng(0).permutation(len(images))
  split = int(0.8 * len(images))
  train, test = order[:split], order[split:]
  return images[train], digits.target[train], images[test], digits.target[test]


def _train(model, images, labels):
  """Adam on softmax cross-entropy, all steps in one jitted scan (fast on CPU)."""
  model.train()
  images, labels = jnp.asarray(images), jnp.asarray(labels)
  graphdef, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
  tx = optax.adam(3e-3)
  batch_indices = np.stack(
      [
          np.random.default_rng(step).choice(len(images), _BATCH, replace=False)
          for step in range(_TRAIN_STEPS)
      ]
  )

  def loss_fn(params, batch_stats, batch_images, batch_labels):
    stepping_model = nnx.merge(graphdef, params, batch_stats, copy=True)
    logits = stepping_model(batch_images)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch_labels).mean()
    return loss, nnx.state(stepping_model, nnx.BatchStat)

  def step(carry, indices):
    params, batch_stats, opt_state = carry
    grads, batch_stats = jax.grad(loss_fn, has_aux=True)(
        params, batch_stats, images[indices], labels[indices]
    )
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), batch_stats, opt_state), None

  @jax.jit
  def train(params, batch_stats):
    carry, _ = jax.lax.scan(step, (params, batch_stats, tx.init(params)), batch_indices)
    return carry[:2]

  params, batch_stats = train(params, batch_stats)
  nnx.update(model, params, batch_stats)
  model.eval()


def _prune_half_of_each_kernel(model):
  """Zeroes the smaller-magnitude half of every kernel, as magnitude pruning would."""
  for _, module in nnx.iter_modules(model):
    kernel = getattr(module, "kernel", None)
    if isinstance(kernel, nnx.Param):
      weights = np.asarray(kernel.get_value())
      flat = weights.reshape(-1).copy()
      flat[np.argsort(np.abs(flat))[: flat.size // 2]] = 0
      kernel.set_value(jnp.asarray(flat.reshape(weights.shape)))


def _new_tiny_cnn():
  # The "rbg" generator compiles in a fraction of the default threefry's time
  # on CPU, which dominates this test otherwise.
  return _TinyCnn(nnx.Rngs(params=jax.random.key(0, impl="rbg")))


@pytest.fixture(scope="module")
def digits():
  return _digits()


@pytest.fixture(scope="module")
def pruned_model(digits):
  train_images, train_labels, _, _ = digits
  model = _new_tiny_cnn()
  _train(model, train_images, train_labels)
  _prune_half_of_each_kernel(model)
  return model


@pytest.fixture(scope="module")
def calibration_batches(digits):
  train_images = digits[0]
  return [train_images[start : start + _BATCH] for start in range(0, 3 * _BATCH, _BATCH)]


@pytest.fixture(scope="module")
def quantized_model(pruned_model, calibration_batches):
  return qwix_ptq.quantize_model(pruned_model, calibration_batches)


def test_int8_accuracy_within_one_point_of_float32(digits, pruned_model, quantized_model):
  _, _, test_images, test_labels = digits
  # 360 test images: one compiled batch shape per model.
  float_accuracy = qwix_ptq.evaluate(pruned_model, test_images, test_labels, 120)
  int8_accuracy = qwix_ptq.evaluate(quantized_model, test_images, test_labels, 120)
  assert float_accuracy > 0.85  # trained: the comparison below means something
  assert abs(int8_accuracy - float_accuracy) <= 0.01


def test_int8_kernels_have_exactly_the_float_zero_positions(pruned_model, quantized_model):
  report = qwix_ptq.int8_weight_sparsity(pruned_model, quantized_model)
  kernel_sizes = [9 * 1 * 8, 9 * 8 * 16, 256 * 10]
  assert report.size == sum(kernel_sizes)
  expected_sparsity = sum(size // 2 for size in kernel_sizes) / sum(kernel_sizes)
  assert report.float_sparsity == pytest.approx(expected_sparsity, abs=1e-12)
  assert report.int8_sparsity == report.float_sparsity
  assert report.zeros_lost == 0 and report.zeros_gained == 0 and report.same_zeros
  float_kernels = {
      name: np.asarray(module.kernel.get_value())
      for name, module in (
          ("conv1", pruned_model.conv1),
          ("conv2", pruned_model.conv2),
          ("head", pruned_model.head),
      )
  }
  for name, int8_values in qwix_ptq.quantized_kernels(quantized_model).items():
    np.testing.assert_array_equal(int8_values == 0, float_kernels[name.split("/")[0]] == 0)


def test_every_conv_and_dense_kernel_is_per_channel_int8(quantized_model):
  kernels = qwix_ptq.quantized_kernels(quantized_model)
  assert sorted(kernels) == ["conv1/kernel", "conv2/kernel", "head/kernel"]
  for int8_values in kernels.values():
    assert int8_values.dtype == np.int8
    # Per-output-channel scales: every channel's largest weight lands on the
    # end of the int8 range (a single per-tensor scale would not do that).
    channel_max = np.abs(int8_values.astype(np.int32)).reshape(-1, int8_values.shape[-1]).max(0)
    assert np.all(channel_max >= 127)


def _activation_scale(quantized_model, layer):
  state = nnx.to_pure_dict(nnx.state(getattr(quantized_model, layer)))
  scales = [value["array"] for name, value in state.items() if name.endswith("_lhs_scale")]
  assert len(scales) == 1, state.keys()
  return float(np.asarray(scales[0]).reshape(()))


def test_activation_scale_is_static_and_calibrated_on_all_batches(
    quantized_model, calibration_batches
):
  # The first conv sees the images themselves: its static scale is the mean
  # over every calibration example of max|x|, over qwix's symmetric int8
  # bound 127.5.
  per_example_max = np.concatenate(
      [np.abs(batch).reshape(len(batch), -1).max(axis=1) for batch in calibration_batches]
  )
  assert _activation_scale(quantized_model, "conv1") == pytest.approx(
      per_example_max.mean() / 127.5, rel=1e-5
  )
  first_batch_only = np.abs(calibration_batches[0]).reshape(_BATCH, -1).max(axis=1).mean()
  assert per_example_max.mean() != pytest.approx(first_batch_only, rel=1e-5)
  for layer in ("conv2", "head"):
    assert _activation_scale(quantized_model, layer) > 0


def test_quantize_model_leaves_the_float_model_unchanged(pruned_model, calibration_batches):
  before = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(pruned_model)))
  qwix_ptq.quantize_model(pruned_model, calibration_batches[:1])
  after = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(pruned_model)))
  jax.tree.map(np.testing.assert_array_equal, before, after)


class _KernelReusedElementwise(nnx.Module):
  """Uses its conv kernel again outside the conv: qwix's PTQ kernel breaks it."""

  def __init__(self, rngs):
    self.conv = nnx.Conv(1, 8, (3, 3), rngs=rngs)

  def __call__(self, images):
    return self.conv(images) * jnp.sum(self.conv.kernel.get_value())


class _Wrapper(nnx.Module):

  def __init__(self, rngs):
    self.inner = _KernelReusedElementwise(rngs)

  def __call__(self, images):
    return self.inner(images)


class _ElementwiseGain(nnx.Module):
  """A 2-D parameter used without any matmul or conv."""

  def __init__(self, rngs):
    self.gain = nnx.Param(jax.random.normal(rngs.params(), (8, 8)))

  def __call__(self, images):
    return images[..., 0] * self.gain.get_value()


def test_layer_qwix_cannot_quantize_gives_value_error_naming_it():
  # The digits batch shape, so that eager ops compiled for the fixture are reused.
  images = jnp.ones((_BATCH, 8, 8, 1))
  with pytest.raises(
      ValueError, match=r"qwix cannot quantize layer 'inner' \(_KernelReusedElementwise\)"
  ):
    qwix_ptq.quantize_model(_Wrapper(nnx.Rngs(0)), [images])


def test_kernel_left_in_float_gives_value_error_naming_it():
  with pytest.raises(ValueError, match="left float: gain"):
    qwix_ptq.quantize_model(_ElementwiseGain(nnx.Rngs(0)), [jnp.ones((2, 8, 8, 1))])


@pytest.mark.parametrize(
    "batches, match",
    [
        ([], "need at least one batch"),
        (
            [np.ones((2, 8, 8, 1)), np.ones((2, 4, 4, 1))],
            "need non-empty batches of one example shape",
        ),
        ([np.ones((2, 5, 5, 1))], r"the model cannot run on a batch of shape \(2, 5, 5, 1\)"),
    ],
)
def test_bad_calibration_batches_are_refused(batches, match):
  with pytest.raises(ValueError, match=f"calibration_batches: {match}"):
    qwix_ptq.quantize_model(_new_tiny_cnn(), batches)


def test_evaluate_counts_correct_argmax_over_uneven_batches():
  labels = np.array([0, 1, 2, 1, 0, 2, 0])
  # Logits pick class (index mod 3): right for indices 0, 1, 2, 5 and 6 (the
  # last, partial batch).
  images = np.arange(len(labels), dtype=np.float32)
  apply_fn = lambda batch: jax.nn.one_hot(batch.astype(jnp.int32) % 3, 3)
  assert qwix_ptq.evaluate(apply_fn, images, labels, batch_size=3) == pytest.approx(5 / 7)


@pytest.mark.parametrize(
    "batch_size, images, labels",
    [
        (0, np.zeros(2), np.zeros(2)),
        (True, np.zeros(2), np.zeros(2)),
        (2, np.zeros(3), np.zeros(2)),
        (2, np.zeros(0), np.zeros(0)),
    ],
)
def test_evaluate_refuses_bad_arguments(batch_size, images, labels):
  with pytest.raises(ValueError):
    qwix_ptq.evaluate(lambda batch: batch, images, labels, batch_size)


def test_model_file_sizes_order_dense_sparse_int8(tmp_path):
  rng = np.random.default_rng(0)
  kernel = rng.normal(size=(64, 512)).astype(np.float32)
  kernel[rng.random(kernel.shape) < 0.9] = 0
  params = {"dense": {"kernel": kernel, "bias": np.zeros(512, np.float32)}}
  sizes = qwix_ptq.model_file_sizes(params, tmp_path)
  dense_bytes = 4 * (kernel.size + 512)
  assert dense_bytes <= sizes.dense_float32 <= dense_bytes + 2048
  assert sizes.sparse_int8 < sizes.sparse_float32 < sizes.dense_float32
  assert sorted(p.name for p in tmp_path.iterdir()) == [
      "dense_float32.npz",
      "sparse_float32.npz",
      "sparse_int8.npz",
  ]
