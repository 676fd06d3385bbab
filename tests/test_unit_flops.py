"""FLOP targets for pruning by units: flipout.flops counts a traced program, unit_groups
models the FLOPs as a function of the live units, units(cost="flops") prunes to a share
of them, and the compacted model has exactly the FLOPs the masks predicted."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import flipout_jax as flipout

_KERNELS = lambda path, leaf: leaf.ndim > 1


class _SmallCNN(nnx.Module):
  """The issue's small CNN (conv 32, conv 64, dense 128), narrower to keep the test quick."""

  def __init__(self, rngs):
    self.c1 = nnx.Conv(1, 16, (3, 3), rngs=rngs)
    self.c2 = nnx.Conv(16, 32, (3, 3), rngs=rngs)
    self.d1 = nnx.Linear(7 * 7 * 32, 64, rngs=rngs)
    self.out = nnx.Linear(64, 10, rngs=rngs)

  def __call__(self, x):
    x = nnx.avg_pool(nnx.relu(self.c1(x)), (2, 2), (2, 2))
    x = nnx.avg_pool(nnx.relu(self.c2(x)), (2, 2), (2, 2))
    return self.out(nnx.relu(self.d1(x.reshape(x.shape[0], -1))))


class _LeNet5(nnx.Module):

  def __init__(self, rngs):
    self.c1 = nnx.Conv(1, 6, (5, 5), padding="VALID", rngs=rngs)
    self.c2 = nnx.Conv(6, 16, (5, 5), padding="VALID", rngs=rngs)
    self.d1 = nnx.Linear(4 * 4 * 16, 120, rngs=rngs)
    self.d2 = nnx.Linear(120, 84, rngs=rngs)
    self.out = nnx.Linear(84, 10, rngs=rngs)

  def __call__(self, x):
    x = nnx.max_pool(nnx.relu(self.c1(x)), (2, 2), (2, 2))
    x = nnx.max_pool(nnx.relu(self.c2(x)), (2, 2), (2, 2))
    x = nnx.relu(self.d1(x.reshape(x.shape[0], -1)))
    return self.out(nnx.relu(self.d2(x)))


class _VGGStyle(nnx.Module):
  """Two stages of two BatchNorm convs, then a hidden dense layer: BatchNorm in eval mode
  (its scale and bias follow their channel) and a global average pool."""

  def __init__(self, rngs):
    widths = (1, 8, 8, 16, 16)
    self.convs = nnx.List(
        [nnx.Conv(a, b, (3, 3), use_bias=False, rngs=rngs) for a, b in zip(widths, widths[1:])]
    )
    self.norms = nnx.List(
        [nnx.BatchNorm(b, use_running_average=True, rngs=rngs) for b in widths[1:]]
    )
    self.d1 = nnx.Linear(16, 32, rngs=rngs)
    self.out = nnx.Linear(32, 10, rngs=rngs)

  def __call__(self, x):
    for number, (conv, norm) in enumerate(zip(self.convs, self.norms)):
      x = nnx.relu(norm(conv(x)))
      if number % 2:
        x = nnx.max_pool(x, (2, 2), (2, 2))
    return self.out(nnx.relu(self.d1(x.mean(axis=(1, 2)))))


_MODELS = {"small_cnn": _SmallCNN, "lenet5": _LeNet5, "vgg_style": _VGGStyle}


def _model(name):
  graphdef, params, rest = nnx.split(_MODELS[name](nnx.Rngs(0)), nnx.Param, ...)
  apply_fn = lambda p, x: nnx.merge(graphdef, p, rest)(x)
  images = jnp.asarray(np.random.default_rng(0).normal(size=(4, 28, 28, 1)), jnp.float32)
  return apply_fn, nnx.to_pure_dict(params), images


def _train(apply_fn, params, images, tx, steps):
  """``steps`` of ``tx`` on a regression to fixed random logits (flips happen), the masks
  after each step."""
  targets = jnp.asarray(np.random.default_rng(1).normal(size=(images.shape[0], 10)), jnp.float32)

  @jax.jit
  def step(params, state):
    grads = jax.grad(lambda p: jnp.mean((apply_fn(p, images) - targets) ** 2))(params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  state, history = tx.init(params), []
  for _ in range(steps):
    params, state = step(params, state)
    history.append(flipout.masks(state))
  return flipout.apply_masks(params, flipout.masks(state)), history


def _live_groups(groups: flipout.UnitGroups, masks) -> np.ndarray:
  """Which groups have a live unit in ``masks`` (Flax kernels: units last)."""
  live = np.zeros(groups.flops.num_groups, bool)
  for ids, mask in zip(_at_masks(groups.ids, masks), jax.tree.leaves(masks)):
    if mask.ndim < 2:  # followers go with their kernels' units
      continue
    units = np.asarray(mask).reshape(-1, mask.shape[-1]).any(axis=0)
    live[ids[(ids >= 0) & units]] = True
  return live


def _at_masks(tree, masks):
  """The leaves of ``tree`` where ``masks`` has a mask (``None`` masks: not prunable)."""
  paths = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(masks)}
  return [
      leaf
      for p, leaf in jax.tree_util.tree_leaves_with_path(tree)
      if jax.tree_util.keystr(p) in paths
  ]


def test_flops_counts_products_grouped_convolutions_and_scan_bodies():
  x, kernel = jnp.ones((3, 5)), jnp.ones((5, 7))
  assert flipout.flops(lambda a, b: a @ b, x, kernel) == 2 * 3 * 5 * 7
  images, depthwise = jnp.ones((2, 6, 6, 4)), jnp.ones((3, 3, 1, 8))
  conv = lambda a, b: jax.lax.conv_general_dilated(
      a, b, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=4
  )
  assert flipout.flops(conv, images, depthwise) == 2 * (2 * 6 * 6 * 8) * (1 * 3 * 3)
  stacked = jnp.ones((4, 5, 5))
  scanned = lambda h, w: jax.lax.scan(lambda c, k: (c @ k, None), h, w)[0]
  assert flipout.flops(scanned, x, stacked) == 4 * 2 * 3 * 5 * 5
  with pytest.raises(TypeError, match="fn must be callable"):
    flipout.flops("model", x)


class _Residual(nn.Module):
  """A stem, a residual block into its stream, a grouped conv and a head (Linen)."""

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(8, (3, 3), name="stem")(x))
    y = nn.relu(nn.Conv(8, (3, 3), feature_group_count=4, name="grouped")(x))
    x = nn.relu(x + nn.Conv(8, (3, 3), name="back")(y))
    return nn.Dense(10, name="head")(nn.relu(nn.Dense(16, name="hidden")(x.mean(axis=(1, 2)))))


@pytest.mark.parametrize("name", [*_MODELS, "residual"])
def test_the_flop_model_of_the_dense_model_is_the_traced_count(name):
  if name == "residual":
    model = _Residual()
    images = jnp.ones((4, 8, 8, 3))
    params = model.init(jax.random.key(0), images)["params"]
    apply_fn = lambda p, x: model.apply({"params": p}, x)
  else:
    apply_fn, params, images = _model(name)
  groups = flipout.unit_groups(apply_fn, params, images, where=_KERNELS)
  assert groups.flops.dense == pytest.approx(flipout.flops(apply_fn, params, images) / 4)


@pytest.mark.parametrize("name", list(_MODELS))
@pytest.mark.parametrize("target", [0.5, 0.7, 0.85])
def test_a_flop_target_is_met_and_the_compacted_model_has_the_predicted_flops(name, target):
  apply_fn, params, images = _model(name)
  groups = flipout.unit_groups(apply_fn, params, images, where=_KERNELS)
  structure = flipout.units(groups, cost="flops", normalize="mean")
  tx = optax.chain(
      optax.sgd(0.05),
      flipout.prune(target, total_steps=12, structure=structure, where=groups.where),
  )
  pruned, history = _train(apply_fn, params, images, tx, 12)
  live = _live_groups(groups, history[-1])
  for ids, mask in zip(_at_masks(groups.ids, history[-1]), jax.tree.leaves(history[-1])):
    if mask.ndim == 1:  # a follower (a bias, a BatchNorm scale): masked with its unit
      np.testing.assert_array_equal(mask, live[ids])
  predicted = float(groups.flops.count(_live_groups(groups, history[-1])))
  compacted = flipout.compact(apply_fn, pruned, images)
  measured = flipout.flops(compacted.apply, compacted.params, images) / 4
  assert measured == pytest.approx(predicted, rel=1e-6)
  assert abs((1 - measured / groups.flops.dense) - target) <= 0.02
  for mask in jax.tree.leaves(history[-1]):  # no layer emptied
    assert np.asarray(mask).reshape(-1, mask.shape[-1]).any(axis=0).sum() >= 1
  assert any(m.ndim == 1 for m in jax.tree.leaves(history[-1]))  # the followers were pruned


def test_the_cubic_ramp_with_units_reaches_each_events_flop_share_on_schedule():
  apply_fn, params, images = _model("small_cnn")
  groups = flipout.unit_groups(apply_fn, params, images, where=_KERNELS)
  schedule = flipout.cubic(begin_step=2, end_step=10, every=2)
  structure = flipout.units(groups, cost="flops", normalize="mean")
  tx = optax.chain(
      optax.sgd(0.05),
      flipout.prune(0.8, total_steps=14, schedule=schedule, structure=structure, where=_KERNELS),
  )
  _, history = _train(apply_fn, params, images, tx, 14)
  removed = [1 - groups.flops.count(_live_groups(groups, m)) / groups.flops.dense for m in history]
  events = flipout.cubic_event_steps(2, 10, 2)
  for step in range(1, 15):
    if step in events:
      share = 0.8 * (1 - (1 - (step - 2) / 8) ** 3)
      assert abs(removed[step - 1] - share) <= 0.02, (step, removed[step - 1], share)
    elif step > 1:  # nothing between events
      assert removed[step - 1] == removed[step - 2]
  assert removed[0] == 0.0


def test_per_layer_normalisation_spreads_the_pruning_over_layers_of_different_scales():
  # Two hidden layers whose weights differ 100x in scale: ranked raw, the small one takes all
  # the pruning down to its floor; divided by each layer's mean score, both lose units.
  rng = np.random.default_rng(0)
  params = {
      "a": jnp.asarray(rng.normal(size=(8, 16)) * 100, jnp.float32),
      "b": jnp.asarray(rng.normal(size=(16, 16)), jnp.float32),
      "out": jnp.asarray(rng.normal(size=(16, 4)), jnp.float32),
  }
  apply_fn = lambda p, x: jnp.tanh(jnp.tanh(x @ p["a"]) @ p["b"]) @ p["out"]
  where = lambda path, leaf: path[0].key != "out"
  x = jnp.ones((2, 8))
  groups = flipout.unit_groups(apply_fn, params, x, where=where)
  live = {}
  for normalize in (None, "mean", "max"):
    structure = flipout.units(groups, cost="flops", normalize=normalize)
    tx = flipout.prune(0.5, total_steps=3, structure=structure, where=where)
    state = tx.init(params)
    zeros = jax.tree.map(jnp.zeros_like, params)
    pruned = params
    for _ in range(3):
      updates, state = tx.update(zeros, state, pruned)
      pruned = optax.apply_updates(pruned, updates)
    masks = flipout.masks(state)
    live[normalize] = (int(masks["a"].any(0).sum()), int(masks["b"].any(0).sum()))
  assert live[None][0] == 16 and live[None][1] < 16
  for normalize in ("mean", "max"):
    assert live[normalize][0] < 16 and live[normalize][1] < 16, live


def test_units_with_unit_groups_default_to_the_kernels_and_their_followers():
  apply_fn, params, images = _model("small_cnn")
  groups = flipout.unit_groups(apply_fn, params, images, where=_KERNELS)
  state = flipout.prune(0.5, total_steps=10, structure=flipout.units(groups)).init(params)
  assert state.masks["c1"]["bias"] is not None and state.masks["out"]["bias"] is None
  # An explicit where wins: the kernels alone.
  tx = flipout.prune(0.5, total_steps=10, structure=flipout.units(groups), where=_KERNELS)
  state = tx.init(params)
  assert state.masks["c1"]["bias"] is None and state.masks["c1"]["kernel"] is not None
  # Plain ids carry no where: the default stays 2+ dimensions.
  state = flipout.prune(0.5, total_steps=10, structure=flipout.units(groups.ids)).init(params)
  assert state.masks["c1"]["bias"] is None


def test_flop_targets_refuse_what_they_cannot_do():
  apply_fn, params, images = _model("small_cnn")
  groups = flipout.unit_groups(apply_fn, params, images, where=_KERNELS)
  with pytest.raises(ValueError, match="cost='flops' needs groups=flipout.unit_groups"):
    flipout.units(groups.ids, cost="flops")
  with pytest.raises(ValueError, match="cost must be one of"):
    flipout.units(groups, cost="macs")
  with pytest.raises(ValueError, match="normalize must be one of"):
    flipout.units(groups, normalize="lamp")
  structure = flipout.units(groups, cost="flops")
  with pytest.raises(ValueError, match="ranks units globally"):
    flipout.prune(0.5, total_steps=10, structure=structure, criterion="magnitude")
  # Only d1 prunable: c1, c2 and the head hold most of the FLOPs, which no unit can remove.
  only_d1 = lambda path, leaf: path[0].key == "d1" and leaf.ndim > 1
  few = flipout.unit_groups(apply_fn, params, images, where=only_d1)
  with pytest.raises(ValueError, match="FLOPs are in prunable units"):
    flipout.prune(
        0.5, total_steps=10, structure=flipout.units(few, cost="flops"), where=only_d1
    ).init(params)


@pytest.mark.parametrize("cost", ["weights", "flops"])
def test_round_to_keeps_each_layer_at_a_multiple_of_its_units(cost):
  apply_fn, params, images = _model("lenet5")  # 6, 16, 120, 84 units: 6 and 84 are not
  groups = flipout.unit_groups(apply_fn, params, images, where=_KERNELS)
  structure = flipout.units(groups, cost=cost, normalize="mean", round_to=4)
  tx = optax.chain(
      optax.sgd(0.05), flipout.prune(0.7, total_steps=12, structure=structure, where=_KERNELS)
  )
  pruned, history = _train(apply_fn, params, images, tx, 12)
  for masks in history:
    for path, mask in jax.tree_util.tree_leaves_with_path(masks):
      units = mask.shape[-1]
      live = int(np.asarray(mask).reshape(-1, units).any(axis=0).sum())
      assert live % 4 == 0 or live == units, (jax.tree_util.keystr(path), live)
  final = history[-1]
  assert (
      sum(int(np.asarray(m).reshape(-1, m.shape[-1]).any(0).sum()) for m in jax.tree.leaves(final))
      < 236
  )
  if cost == "flops":
    compacted = flipout.compact(apply_fn, pruned, images)
    measured = flipout.flops(compacted.apply, compacted.params, images) / 4
    assert measured == pytest.approx(groups.flops.count(_live_groups(groups, final)), rel=1e-6)
    assert abs((1 - measured / groups.flops.dense) - 0.7) <= 0.03


def test_round_to_is_checked():
  with pytest.raises(ValueError, match="round_to must be an int >= 1"):
    flipout.units(round_to=0)


@pytest.mark.parametrize("followers", [True, False])
def test_a_pruned_units_bias_is_masked_so_compaction_removes_the_whole_channel(followers):
  # Biases of +1: a channel whose kernel is pruned but whose bias lives is relu(1) = 1
  # everywhere, and the next conv reads it through zero padding: compaction into params
  # alone (the model's own code at smaller widths) must keep it.
  apply_fn, params, images = _model("small_cnn")
  params = jax.tree_util.tree_map_with_path(
      lambda path, leaf: jnp.ones_like(leaf) if path[-1].key == "bias" else leaf, params
  )
  groups = flipout.unit_groups(apply_fn, params, images, where=_KERNELS)
  where = groups.where if followers else _KERNELS
  tx = optax.chain(
      optax.sgd(0.05),
      flipout.prune(0.7, total_steps=6, structure=flipout.units(groups, cost="flops"), where=where),
  )
  pruned, history = _train(apply_fn, params, images, tx, 6)
  predicted = float(groups.flops.count(_live_groups(groups, history[-1])))
  compacted = flipout.compact(apply_fn, pruned, images, constants="params")
  measured = flipout.flops(compacted.apply, compacted.params, images) / 4
  if followers:
    assert measured == pytest.approx(predicted, rel=1e-6)
  else:
    assert measured > predicted * 1.05
