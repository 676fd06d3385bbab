"""--init: PyTorch's default initialisation per layer kind, the entry defaults, old runs resume."""

import dataclasses
import json
import math

import numpy as np
import pytest
from flax import nnx

from experiments import cifar, cli, digits, initializers, mnist, models, run_state
from experiments import config as config_lib


def layers_of(name, init, seed=0):
  """``(kind, kernel, bias or None)`` of every Linear and Conv layer of the model ``name``
  built with ``init``, as NumPy (kind from the kernel's rank: 2 Linear, 4 Conv)."""

  def create():
    model = models.create_model(name, input_shape=(32, 32, 3), num_classes=10, rngs=nnx.Rngs(seed))
    initializers.apply_init(model, init, seed)
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))

  found = []

  def visit(tree):
    if "kernel" in tree and tree["kernel"].ndim in (2, 4):
      kind = "Linear" if tree["kernel"].ndim == 2 else "Conv"
      bias = tree.get("bias")
      found.append((kind, np.asarray(tree["kernel"]), None if bias is None else np.asarray(bias)))
      return
    for child in tree.values():
      if isinstance(child, dict):
        visit(child)

  # One compiled call: eager initialisation of ResNet18 dispatches hundreds of ops (~30 s).
  visit(run_state.run_once(create))
  return found


@pytest.mark.parametrize("name", ["lenet5", "resnet18"])  # conv + linear with and without bias
def test_torch_init_is_uniform_within_one_over_sqrt_fan_in_for_every_layer(name):
  kinds = set()
  for kind, kernel, bias in layers_of(name, "torch"):
    kinds.add((kind, bias is not None))
    bound = 1 / math.sqrt(math.prod(kernel.shape[:-1]))
    assert np.abs(kernel).max() <= bound
    if kernel.size >= 2000:  # enough draws to see the shape of the distribution
      assert np.abs(kernel).max() > 0.99 * bound
      # U(-b, b) has standard deviation b / sqrt(3), and no mass piled at 0 as a normal.
      np.testing.assert_allclose(kernel.std(), bound / math.sqrt(3), rtol=0.05)
      assert abs(np.mean(np.abs(kernel) < bound / 2) - 0.5) < 0.05
    if bias is not None:
      assert np.abs(bias).max() <= bound and np.abs(bias).max() > 0.5 * bound
  expected = {("Linear", True), ("Conv", name == "lenet5")}
  assert expected <= kinds


def test_flax_init_keeps_the_models_own_spread():
  layers = layers_of("lenet5", "flax")
  _, conv, conv_bias = next(layer for layer in layers if layer[0] == "Conv")
  _, head, head_bias = [layer for layer in layers if layer[0] == "Linear"][-1]
  # He-normal fan-out for convolutions, lecun-normal for Linear, zero biases.
  np.testing.assert_allclose(conv.std(), math.sqrt(2 / (25 * conv.shape[-1])), rtol=0.15)
  np.testing.assert_allclose(head.std(), 1 / math.sqrt(head.shape[0]), rtol=0.15)
  assert not conv_bias.any() and not head_bias.any()


def test_run_setup_follows_the_configs_init_and_seed():
  def first_kernel(init, seed=0):
    config = dataclasses.replace(mnist.DEFAULTS, init=init, seed=seed, method="dense")
    setup = run_state.build_setup(config, (28, 28, 1), 10, steps_per_epoch=10)
    return np.asarray(setup.state["params"]["head"]["layers"][0]["kernel"])

  torch_kernel = first_kernel("torch")
  bound = 1 / math.sqrt(28 * 28)
  assert np.abs(torch_kernel).max() <= bound < np.abs(first_kernel("flax")).max()
  np.testing.assert_array_equal(torch_kernel, first_kernel("torch"))
  assert not np.array_equal(torch_kernel, first_kernel("torch", seed=1))


def test_entry_defaults_and_validation():
  assert cifar.DEFAULTS.init == "torch"
  assert mnist.DEFAULTS.init == digits.DEFAULTS.init == "flax"
  with pytest.raises(config_lib.ConfigError, match="--init must be one of flax, torch"):
    config_lib.validate_config(dataclasses.replace(mnist.DEFAULTS, init="he"))
  with pytest.raises(ValueError, match="init must be one of"):
    model = models.create_model("lenet300", input_shape=(4, 4, 1), num_classes=2, rngs=nnx.Rngs(0))
    initializers.apply_init(model, "xavier", 0)


def test_a_run_saved_before_init_existed_resumes_with_flax(tmp_path, capsys):
  # The entry point now defaults to torch, as experiments.cifar does.
  defaults = dataclasses.replace(digits.DEFAULTS, init="torch")
  entry = lambda *argv: cli.main(list(argv), defaults, ("lenet300",), prog="entry")
  run = ["--method=global_magnitude", "--sparsity=0.5", "--epochs=1", f"--workdir={tmp_path}"]
  assert entry(*run, "--init=flax") == 0
  # Make its checkpoint an old one: a saved config without the init field (and, as all
  # checkpoints written before the init existed, without a checksum).
  (metadata_file,) = tmp_path.glob("checkpoints/*/metadata/metadata")
  metadata = json.loads(metadata_file.read_text())
  del metadata["config"]["init"]
  del metadata["crc32"]
  metadata_file.write_text(json.dumps(metadata))
  capsys.readouterr()

  assert entry(*run, "--resume") == 0, capsys.readouterr().err
  assert json.loads((tmp_path / "summary.json").read_text())["config"]["init"] == "flax"
  # Asking for another initialisation is asking for another run: refused in one line.
  assert entry(*run, "--resume", "--init=torch") == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "--init 'flax' -> 'torch'" in err[0]
