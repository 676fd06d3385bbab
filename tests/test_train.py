"""The shared trainer: every pruning method end to end, the optimizer recipe, the outputs, and
that every entry point runs (tiny digits / synthetic runs on CPU)."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from experiments import checkpoints, cifar, digits, imagenette, mnist, models, optimizers, plot, train
from experiments import config as config_lib

# LeNet-300-100 on 8x8 digits: 64*300 + 300*100 + 100*10 prunable kernel weights.
PRUNABLE = 64 * 300 + 300 * 100 + 100 * 10
SPARSITY = 0.9


def digits_config(tmp_path, **overrides) -> config_lib.Config:
  """The digits demo's recipe, shortened to two epochs of 22 steps."""
  return dataclasses.replace(digits.DEFAULTS, epochs=2, workdir=str(tmp_path / "run"), **overrides)


def read_metrics(workdir) -> list[dict]:
  return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize(
    "method", ["global_magnitude", "magnitude", "random", "snip", "hoyer_square"]
)
def test_pruning_method_reaches_exact_target_with_zeros_where_masked(tmp_path, method):
  # flipout itself runs in test_resume, test_devices and the digits demo test.
  config = digits_config(tmp_path, method=method, sparsity=SPARSITY)
  summary = train.train(config)

  pruned = round(SPARSITY * PRUNABLE)
  assert summary["prunable_weights"] == PRUNABLE
  assert summary["live_weights"] == PRUNABLE - pruned
  assert summary["non_finite_weights"] == 0
  assert summary["sparsity"] == pytest.approx(pruned / PRUNABLE, abs=1e-12)
  assert summary["dense_flops"] == 2 * PRUNABLE  # one image through three Linear layers
  assert summary["live_flops"] == 2 * (PRUNABLE - pruned)
  assert summary["synthetic"] is False
  assert [layer["size"] for layer in summary["layers"]] == [64 * 300, 300 * 100, 100 * 10]

  restored = checkpoints.load_run(config.workdir)
  assert restored.epoch == config.epochs
  kernels = {
      path: np.asarray(leaf)
      for path, leaf in jax.tree_util.tree_leaves_with_path(
          nnx.to_pure_dict(nnx.state(restored.model, nnx.Param))
      )
      if np.ndim(leaf) >= 2
  }
  masks = {
      path: np.asarray(leaf) for path, leaf in jax.tree_util.tree_leaves_with_path(restored.masks)
  }
  flips = {
      path: np.asarray(leaf)
      for path, leaf in jax.tree_util.tree_leaves_with_path(restored.flip_counts)
  }
  assert masks.keys() == kernels.keys() == flips.keys()
  assert sum(int((~mask).sum()) for mask in masks.values()) == pruned
  for path, kernel in kernels.items():
    assert np.all(kernel[~masks[path]] == 0), path
    assert np.all(flips[path][~masks[path]] == 0), path
  if method == "magnitude":  # layer-wise: every layer at the target on its own
    for layer in summary["layers"]:
      assert layer["sparsity"] == pytest.approx(SPARSITY, abs=1.0 / layer["size"])

  records = read_metrics(tmp_path / "run")
  assert [record["epoch"] for record in records] == [1, 2]
  assert [record["step"] for record in records] == [22, 44]
  assert records[-1]["sparsity"] == pytest.approx(summary["sparsity"])
  if method == "snip":  # pruned before the first step
    assert records[0]["sparsity"] == pytest.approx(summary["sparsity"])
  if method == "hoyer_square":  # one event at step round(44 / 2) = 22, the end of epoch 1
    assert records[0]["sparsity"] == pytest.approx(summary["sparsity"])
  written = json.loads((tmp_path / "run" / "summary.json").read_text())
  assert written["test_accuracy"] == summary["test_accuracy"]
  assert written["config"]["method"] == method


def test_coupled_weight_decay_then_momentum_sgd():
  """SGD with coupled weight decay (PyTorch's): v <- m v + (g + wd w); w <- w - lr v."""
  config = config_lib.Config(
      method="dense", lr=0.1, momentum=0.9, weight_decay=0.01, milestones=(1,), epochs=3
  )
  tx = optimizers.build_optimizer(config, steps_per_epoch=2)
  weights = {"kernel": jnp.array([[1.0, -2.0]]), "bias": jnp.array([0.5])}
  grads = {"kernel": jnp.array([[0.3, 0.1]]), "bias": jnp.array([-1.0])}
  state = tx.init(weights)
  velocity = jax.tree.map(jnp.zeros_like, weights)
  for step, lr in enumerate([0.1, 0.1, 0.01]):  # milestone 1 epoch = 2 steps
    updates, state = tx.update(grads, state, weights)
    velocity = jax.tree.map(lambda v, g, w: 0.9 * v + g + 0.01 * w, velocity, grads, weights)
    expected = jax.tree.map(lambda v: -lr * v, velocity)
    for actual, wanted in zip(jax.tree.leaves(updates), jax.tree.leaves(expected)):
      np.testing.assert_allclose(actual, wanted, rtol=1e-6, err_msg=f"step {step}")
    weights = optax.apply_updates(weights, updates)


def test_learning_rate_drops_tenfold_at_each_milestone():
  config = config_lib.Config(lr=0.2, milestones=(2, 5), epochs=8)
  schedule = optimizers.learning_rate_schedule(config, steps_per_epoch=10)
  expected = {0: 0.2, 19: 0.2, 20: 0.02, 49: 0.02, 50: 0.002, 79: 0.002}
  for step, lr in expected.items():
    assert float(schedule(step)) == pytest.approx(lr, rel=1e-6)


def test_synthetic_run_through_mnist_entry_point_is_marked_synthetic(tmp_path, capsys):
  workdir = tmp_path / "mnist"
  status = mnist.main(
      [
          "--model=lenet300",
          "--method=dense",
          "--synthetic",
          "--epochs=2",
          "--batch_size=16",
          "--synthetic_train=48",
          "--synthetic_test=20",
          f"--workdir={workdir}",
          "--no-progress",
          "--tensorboard",
      ]
  )
  assert status == 0
  summary = json.loads((workdir / "summary.json").read_text())
  assert summary["synthetic"] is True and summary["config"]["synthetic"] is True
  assert summary["steps"] == 2 * (48 // 16)
  assert summary["sparsity"] == 0.0
  assert all(record["synthetic"] for record in read_metrics(workdir))
  assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))
  assert sorted(path.name for path in (workdir / "checkpoints").iterdir()) == ["1", "2"]


def test_cifar_entry_point_runs_steps_on_synthetic_data(tmp_path):
  workdir = tmp_path / "cifar"
  # Dense keeps the compile short; pruning conv kernels is covered by the imagenette test.
  status = cifar.main(
      [
          "--model=vgg11",
          "--method=dense",
          "--synthetic",
          "--epochs=2",
          "--batch_size=4",
          "--synthetic_train=8",
          "--synthetic_test=4",
          f"--workdir={workdir}",
          "--no-progress",
          "--no-tensorboard",
      ]
  )
  assert status == 0
  summary = json.loads((workdir / "summary.json").read_text())
  assert summary["synthetic"] is True
  assert summary["config"]["dataset"] == "cifar10" and summary["steps"] == 4
  assert summary["sparsity"] == 0.0
  assert summary["live_flops"] == summary["dense_flops"] > 0


class _TinyConvNet(nnx.Module):
  """Stands in for DenseNet-121 where only the entry point around the model is tested."""

  def __init__(self, *, input_shape, num_classes, rngs):
    self.conv = nnx.Conv(input_shape[2], 4, (3, 3), strides=8, rngs=rngs)
    self.head = nnx.Linear(4, num_classes, rngs=rngs)

  def __call__(self, images):
    return self.head(jnp.mean(jax.nn.relu(self.conv(images)), axis=(1, 2)))


def test_imagenette_entry_point_runs_steps_on_synthetic_224px_data(tmp_path, monkeypatch):
  # DenseNet-121 takes minutes to compile on 2 CPU cores: the entry point's own part (224x224
  # images, crop padding 28, flips, the recipe) runs with a tiny network in its place, and
  # DenseNet-121 itself is tested in test_models.py.
  built = []

  def tiny_model(name, **kwargs):
    built.append((name, kwargs["input_shape"]))
    return _TinyConvNet(**kwargs)

  monkeypatch.setattr(models, "create_model", tiny_model)
  workdir = tmp_path / "imagenette"
  status = imagenette.main(
      [
          "--synthetic",
          "--epochs=1",
          "--batch_size=2",
          "--sparsity=0.5",
          "--synthetic_train=4",
          "--synthetic_test=2",
          f"--workdir={workdir}",
          "--no-progress",
          "--no-tensorboard",
      ]
  )
  assert status == 0
  assert set(built) == {("densenet121", (224, 224, 3))}
  summary = json.loads((workdir / "summary.json").read_text())
  assert summary["config"]["model"] == "densenet121" and summary["synthetic"] is True
  assert summary["config"]["method"] == "flipout" and summary["steps"] == 2
  assert summary["sparsity"] == pytest.approx(0.5, abs=1e-3)


@pytest.mark.parametrize("module, model", [(cifar, "vgg19"), (cifar, "resnet18")])
def test_paper_models_build_their_train_step(module, model):
  """The paper's runs, with their real batch size and chain, trace and lower (no compile).

  DenseNet-121 is left out: tracing its train-mode BatchNorm updates takes Flax 30-40 s on
  2 CPU cores (each update asks a tracer for its sharding, which makes JAX search the
  whole trace); the model itself is tested in test_models.py.
  """
  config = dataclasses.replace(
      module.DEFAULTS, model=model, synthetic_train=module.DEFAULTS.batch_size, synthetic_test=8
  )
  lowered = train.lower_train_step(config)
  text = lowered.as_text()
  assert "sharding" in text
  # The step returns the new state: params shaped as the model's.
  out_params = lowered.out_info[0]["params"]
  assert sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(out_params)) > 1_000_000


def test_digits_demo_prints_one_table_and_plot_reads_it(tmp_path, capsys, monkeypatch):
  workdir = tmp_path / "demo"
  # flipout itself runs in test_resume and test_devices; global_magnitude compiles faster.
  argv = [
      "--epochs=2",
      "--methods=global_magnitude,dense",
      "--sparsities=0.9,0.98",
      f"--workdir={workdir}",
  ]
  assert digits.main(argv) == 0
  table = capsys.readouterr().out
  lines = table.splitlines()
  cells = [[cell.strip() for cell in line.strip("| ").split("|")] for line in lines if "|" in line]
  assert cells[0] == ["method", "0%", "90%", "98%"]
  rows = {row[0]: row for row in cells if row[0] in ("global_magnitude", "dense")}
  pruned_row = rows["global_magnitude"]
  assert pruned_row[1] == "-" and "(5,020)" in pruned_row[2] and "(1,004)" in pruned_row[3]
  assert "(50,200)" in rows["dense"][1]  # 10% and 2% of 50,200 above
  dense_accuracy = float(rows["dense"][1].split()[0].rstrip("%"))
  pruned_accuracy = float(pruned_row[2].split()[0].rstrip("%"))
  assert dense_accuracy > 80 and pruned_accuracy > 50  # chance is 10%
  assert "3 runs in" in lines[-1]

  # Finished runs are read back, not trained again.
  monkeypatch.setattr(
      train,
      "_make_train_step",
      lambda *args, **kwargs: lambda *a, **k: pytest.fail("trained again"),
  )
  assert digits.main(argv) == 0
  assert capsys.readouterr().out.splitlines()[:-1] == lines[:-1]

  figure = tmp_path / "figure.png"
  assert plot.main([str(workdir), f"--output={figure}"]) == 0
  assert figure.read_bytes().startswith(b"\x89PNG")
  printed = capsys.readouterr().out
  dense_summary = json.loads((workdir / "dense" / "summary.json").read_text())
  assert round(100 * dense_summary["test_accuracy"], 1) == dense_accuracy
  assert f"{100 * dense_summary['test_accuracy']:.2f} ± 0.00" in printed  # one seed


def test_plot_groups_seeds_into_mean_and_sample_std():
  def summary(seed, accuracy, method="flipout", synthetic=False):
    return {
        "config": {
            "dataset": "cifar10",
            "model": "vgg19",
            "method": method,
            "sparsity": 0.999,
            "seed": seed,
        },
        "test_accuracy": accuracy,
        "live_weights": 20_000,
        "synthetic": synthetic,
    }

  groups = plot.group_runs(
      [
          summary(0, 0.8),
          summary(1, 0.9),
          summary(2, 1.0),
          summary(0, 0.5, method="dense"),
          summary(3, 0.1, synthetic=True),
      ]
  )
  assert [(group.method, group.sparsity) for group in groups] == [
      ("dense", 0.0),
      ("flipout", 0.999),
  ]
  flipout_group = groups[1]
  assert flipout_group.accuracies == (0.8, 0.9, 1.0)  # the synthetic run is left out
  assert flipout_group.mean == pytest.approx(0.9)
  assert flipout_group.std == pytest.approx(0.1)  # sample std: sqrt((0.01 + 0 + 0.01) / 2)
  assert "90.00 ± 10.00" in plot.format_table(groups)
