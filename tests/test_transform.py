"""prune inside real training: optimizers, chains, wrappers, Flax APIs, errors."""

import inspect
import pydoc
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen
from flax import nnx

import flipout_jax as flipout

TOTAL_STEPS = 60  # events at 12, 24, 36, 48 for 90% at rate 0.5
RUN_STEPS = 260  # so 212 steps follow the last event


def _data(seed=0, n=64):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, 10)).astype(np.float32)
  y = (x[:, :3].sum(axis=1) > 0).astype(np.int32) + (x[:, 3] > 1)
  return jnp.asarray(x), jnp.asarray(y)


def _mlp_params(seed=0):
  rng = np.random.default_rng(seed)
  return {
      "hidden": {
          "kernel": jnp.asarray(rng.normal(size=(10, 32)) * 0.3, jnp.float32),
          "bias": jnp.zeros(32),
      },
      "out": {
          "kernel": jnp.asarray(rng.normal(size=(32, 3)) * 0.3, jnp.float32),
          "bias": jnp.zeros(3),
      },
  }


def _loss(params, x, y):
  hidden = jax.nn.relu(x @ params["hidden"]["kernel"] + params["hidden"]["bias"])
  logits = hidden @ params["out"]["kernel"] + params["out"]["bias"]
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def _train(tx, steps=RUN_STEPS, params=None):
  """Runs `steps` updates in one scan; returns the largest pruned |w| per step."""
  x, y = _data()
  params = _mlp_params() if params is None else params

  def step(carry, _):
    params, state = carry
    grads = jax.grad(_loss)(params, x, y)
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
    masks = flipout.masks(state)
    leaked = jnp.maximum(
        *[
            jnp.max(jnp.where(masks[k]["kernel"], 0.0, jnp.abs(params[k]["kernel"])))
            for k in ("hidden", "out")
        ]
    )
    return (params, state), leaked

  (params, state), leaked = jax.jit(lambda p, s: jax.lax.scan(step, (p, s), None, length=steps))(
      params, tx.init(params)
  )
  return params, state, np.asarray(leaked)


OPTIMIZERS = {
    "sgd": optax.sgd(0.1),
    "momentum": optax.sgd(0.1, momentum=0.9),
    "nesterov": optax.sgd(0.1, momentum=0.9, nesterov=True),
    "adam": optax.adam(1e-2),
    "adamw": optax.adamw(1e-2, weight_decay=1e-2),
    "rmsprop": optax.rmsprop(1e-2, momentum=0.9),
    "coupled_weight_decay": optax.chain(
        optax.add_decayed_weights(5e-4), optax.sgd(0.1, momentum=0.9)
    ),
}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_pruned_weights_stay_exactly_zero(name):
  tx = optax.chain(
      flipout.gradient_noise(1.0), OPTIMIZERS[name], flipout.prune(0.9, total_steps=TOTAL_STEPS)
  )
  params, state, leaked = _train(tx)
  assert np.all(leaked == 0.0), f"pruned weights moved at steps {np.flatnonzero(leaked)}"
  report = flipout.summary(params)
  assert report.size - report.live == round(0.9 * report.size)


def test_prune_first_in_chain_fails_loudly():
  tx = optax.chain(flipout.prune(0.5, total_steps=10), optax.sgd(0.1, momentum=0.9))
  params, state, _ = _train(tx, steps=12)
  # The second update finds params that did not move by prune's update: the
  # run stops with NaN params instead of going on as a dense model.
  for name in ("hidden", "out"):
    assert np.all(np.isnan(np.asarray(params[name]["kernel"])))
  with pytest.raises(ValueError, match="LAST in optax.chain"):
    flipout.masks(state)
  with pytest.raises(ValueError, match="LAST in optax.chain"):
    flipout.flip_counts(state)


def test_prune_last_in_chain_never_trips_the_order_check():
  tx = optax.chain(optax.sgd(0.1, momentum=0.9), flipout.prune(0.5, total_steps=10))
  params, state, _ = _train(tx, steps=30)
  assert int(state[-1].count) == 30
  assert not np.any(np.isnan(np.asarray(params["out"]["kernel"])))


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(target_sparsity=0.0, total_steps=10),
        dict(schedule=flipout.halving(every=10), total_steps=10),
    ],
)
def test_schedules_without_events_train_dense(kwargs):
  # A target of 0 has no events; nor has rate mode when no multiple of `every` comes
  # before the last step.
  tx = optax.chain(optax.sgd(0.1), flipout.prune(**kwargs))
  params, state, _ = _train(tx, steps=10)
  assert all(bool(m.all()) for m in jax.tree.leaves(flipout.masks(state)))
  assert flipout.sparsity(params) == 0.0 and int(state[-1].count) == 10


def test_inside_multisteps():
  inner = optax.chain(optax.sgd(0.1, momentum=0.9), flipout.prune(0.8, total_steps=30))
  tx = optax.MultiSteps(inner, every_k_schedule=2)
  params, state, leaked = _train(tx, steps=80)
  assert np.all(leaked == 0.0)
  report = flipout.summary(params)
  assert report.size - report.live == round(0.8 * report.size)
  assert int(flipout.masks(state)["out"]["kernel"].sum()) == report.layers[1].live


def test_flax_linen_params_dict():
  model = linen.Sequential([linen.Dense(16), linen.relu, linen.Dense(3)])
  x, y = _data()
  params = model.init(jax.random.key(0), x)["params"]
  tx = optax.chain(optax.adam(1e-2), flipout.prune(0.7, total_steps=20))
  state = tx.init(params)

  @jax.jit
  def step(params, state):
    loss = lambda p: optax.softmax_cross_entropy_with_integer_labels(
        model.apply({"params": p}, x), y
    ).mean()
    updates, state = tx.update(jax.grad(loss)(params), state, params)
    return optax.apply_updates(params, updates), state

  for _ in range(25):
    params, state = step(params, state)
  masks = flipout.masks(state)
  assert masks["layers_0"]["bias"] is None
  report = flipout.summary(params)
  assert report.size - report.live == round(0.7 * report.size)
  np.testing.assert_array_equal(
      np.asarray(masks["layers_2"]["kernel"]), np.asarray(params["layers_2"]["kernel"]) != 0
  )


class _NnxNet(nnx.Module):

  def __init__(self, rngs):
    self.hidden = nnx.Linear(10, 32, rngs=rngs)
    self.norm = nnx.BatchNorm(32, rngs=rngs)
    self.out = nnx.Linear(32, 3, rngs=rngs)

  def __call__(self, x):
    return self.out(nnx.relu(self.norm(self.hidden(x))))


def test_flax_nnx_optimizer():
  model = _NnxNet(nnx.Rngs(0))
  tx = optax.chain(
      flipout.gradient_noise(1.0), optax.sgd(0.1, momentum=0.9), flipout.prune(0.9, total_steps=30)
  )
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  x, y = _data()

  @nnx.jit
  def step(model, optimizer):
    loss = lambda m: optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()
    optimizer.update(model, nnx.grad(loss)(model))

  for _ in range(40):
    step(model, optimizer)
  report = flipout.summary(nnx.state(model, nnx.Param))
  assert len(report.layers) == 2
  assert report.size == 10 * 32 + 32 * 3
  assert report.size - report.live == round(0.9 * report.size)
  live = sum(int(np.asarray(m).sum()) for m in jax.tree.leaves(flipout.masks(optimizer.opt_state)))
  assert live == report.live


def test_fixed_masks_zero_dense_params_then_hold():
  params = _mlp_params()
  masks = _every_third_masks(params)
  tx = optax.chain(optax.adam(1e-2), flipout.fixed_masks(masks))
  params, state, leaked = _train(tx, steps=50, params=params)
  assert np.all(leaked == 0.0)
  for name in ("hidden", "out"):
    np.testing.assert_array_equal(
        np.asarray(params[name]["kernel"]) != 0, np.asarray(masks[name]["kernel"])
    )
    # Zeroing the masked weights of the dense params on step 1 is not a flip.
    flips = np.asarray(flipout.flip_counts(state)[name]["kernel"])
    assert np.all(flips[~np.asarray(masks[name]["kernel"])] == 0)
    assert flips.sum() > 0


def test_prune_below_once_at_step():
  params = _mlp_params()
  tx = optax.chain(optax.sgd(0.05), flipout.prune_below(0.2, step=10))
  x, y = _data()
  state = tx.init(params)
  update = jax.jit(tx.update)
  for step in range(1, 21):
    updates, state = update(jax.grad(_loss)(params, x, y), state, params)
    if step == 10:
      expected_live = jax.tree.map(lambda p, u: jnp.abs(p + u) >= 0.2, params, updates)
    params = optax.apply_updates(params, updates)
    if step == 10:
      for name in ("hidden", "out"):
        np.testing.assert_array_equal(
            flipout.masks(state)[name]["kernel"], expected_live[name]["kernel"]
        )
  assert 0 < flipout.sparsity(params) < 1
  for name in ("hidden", "out"):
    np.testing.assert_array_equal(
        np.asarray(params[name]["kernel"]) == 0, ~np.asarray(flipout.masks(state)[name]["kernel"])
    )


# ---------------------------------------------------------------------------
# Errors: refused early, naming the argument.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(target_sparsity=1.0, total_steps=10), ValueError, "target_sparsity must be in"),
        (dict(target_sparsity=-0.1, total_steps=10), ValueError, "target_sparsity"),
        (dict(target_sparsity="0.5", total_steps=10), TypeError, "target_sparsity"),
        (dict(target_sparsity=0.5, total_steps=0), ValueError, "total_steps must be a positive"),
        (dict(target_sparsity=0.5, total_steps=2.5), TypeError, "total_steps"),
        (dict(target_sparsity=0.5), ValueError, r"total_steps .*halving\(every"),
        (dict(), ValueError, "needs a schedule"),
        (dict(target_sparsity=0.999, total_steps=30), ValueError, "too short.*total_steps >= 51"),
        (
            dict(target_sparsity=0.5, total_steps=10, criterion="snipe"),
            ValueError,
            "criterion must be one of",
        ),
        (dict(target_sparsity=0.5, total_steps=10, criterion=3), TypeError, "criterion"),
        (dict(target_sparsity=0.5, total_steps=10, where=[1, 2]), TypeError, "where"),
        (dict(target_sparsity=0.5, total_steps=10, structure=3), TypeError, "structure must be"),
    ],
)
def test_prune_refuses_bad_arguments(kwargs, error, match):
  with pytest.raises(error, match=match):
    flipout.prune(**kwargs)


@pytest.mark.parametrize(
    "build,error,match",
    [
        (lambda: flipout.halving(rate=0.0), ValueError, r"rate must be in \(0, 1\)"),
        (lambda: flipout.halving(rate=1.0), ValueError, "rate"),
        (lambda: flipout.halving(every=-3), ValueError, "every must be a positive int"),
        (lambda: flipout.halving(every=2.5), TypeError, "every"),
        (lambda: flipout.flipout_criterion(p=0), ValueError, "p must be > 0"),
        (lambda: flipout.flipout_criterion(p="2"), TypeError, "p must be a positive number"),
        (lambda: flipout.random_criterion(seed=1.5), TypeError, "seed must be an int"),
        (lambda: flipout.magnitude_criterion(layerwise=1), TypeError, "layerwise must be a bool"),
        (lambda: flipout.units(score="max"), ValueError, r"score must be one of \('mean', 'sum'\)"),
        (lambda: flipout.units(min_units=-1), ValueError, "min_units must be an int >= 0"),
        (lambda: flipout.units(kernel_layout="io"), ValueError, "kernel_layout must be one of"),
        (lambda: flipout.n_of_m(4, 2), ValueError, "0 < n < m"),
        (lambda: flipout.n_of_m(2, 4.0), TypeError, "m must be an int"),
    ],
)
def test_option_values_refuse_bad_arguments_when_built(build, error, match):
  with pytest.raises(error, match=match):
    build()


@pytest.mark.parametrize(
    "keyword,value,instead",
    [
        ("prune_every", 10, "schedule=flipout.halving(every=...)"),
        ("rate", 0.3, "schedule=flipout.halving(rate=...)"),
        ("begin_step", 2, "schedule=flipout.cubic(begin_step=..., end_step=..., every=...)"),
        ("end_step", 9, "schedule=flipout.cubic("),
        ("initial_sparsity", 0.1, "schedule=flipout.cubic(..., initial_sparsity=...)"),
        ("p", 3.0, "criterion=flipout.flipout_criterion(p=...)"),
        ("seed", 1, "criterion=flipout.random_criterion(seed=...)"),
        ("groups", {}, "structure=flipout.units(groups)"),
        ("group_score", "sum", "structure=flipout.units(groups, score=...)"),
        ("min_units", 0, "structure=flipout.units(groups, min_units=...)"),
        ("kernel_layout", "out_in", "flipout.n_of_m(n, m, kernel_layout=...)"),
    ],
)
def test_a_keyword_of_earlier_versions_says_what_to_write_instead(keyword, value, instead):
  with pytest.raises(
      TypeError, match=f"prune: {keyword}= is no longer a keyword; write .*" + re.escape(instead)
  ):
    flipout.prune(0.5, total_steps=10, **{keyword: value})


def test_prune_takes_ten_parameters_at_most_and_its_help_fits_a_screen():
  assert len(inspect.signature(flipout.prune).parameters) <= 10
  assert len(pydoc.render_doc(flipout.prune, renderer=pydoc.plaintext).splitlines()) <= 60


@pytest.mark.parametrize(
    "spelled,built",
    [
        (dict(criterion="flipout"), dict(criterion=flipout.flipout_criterion(2.0))),
        (dict(criterion="magnitude"), dict(criterion=flipout.magnitude_criterion(True))),
        (dict(criterion="random"), dict(criterion=flipout.random_criterion(0))),
        (dict(structure="unit"), dict(structure=flipout.units())),
        (dict(structure="2:4"), dict(structure=flipout.n_of_m(2, 4))),
        (dict(schedule="halving"), dict(schedule=flipout.halving(0.5))),
    ],
)
def test_a_default_spelled_as_a_string_prunes_as_its_value(spelled, built):
  rng = np.random.default_rng(0)
  params = {
      "a": jnp.asarray(rng.normal(size=(8, 8)), jnp.float32),
      "b": jnp.asarray(rng.normal(size=(8, 4)), jnp.float32),
  }
  grads = [
      jax.tree.map(lambda w: jnp.asarray(rng.normal(size=w.shape), w.dtype), params)
      for _ in range(12)
  ]
  target = {} if ":" in spelled.get("structure", "") else dict(target_sparsity=0.75)
  trained = []
  for kw in (spelled, built):
    tx = optax.chain(optax.sgd(0.3), flipout.prune(**target, total_steps=12, **kw))
    state, current = tx.init(params), params
    for g in grads:
      updates, state = tx.update(g, state, current)
      current = optax.apply_updates(current, updates)
    trained.append(current)
  for a, b in zip(jax.tree.leaves(trained[0]), jax.tree.leaves(trained[1])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert flipout.sparsity(trained[0]) >= 0.5


def test_where_selecting_nothing_lists_the_leaves():
  tx = flipout.prune(0.5, total_steps=10, where=lambda path, leaf: False)
  with pytest.raises(
      ValueError, match=r"selects no prunable leaf.*\['hidden'\]\['kernel'\] \(10, 32\)"
  ):
    tx.init(_mlp_params())


def test_params_that_do_not_match_the_state():
  tx = flipout.prune(0.5, total_steps=10)
  state = tx.init(_mlp_params())
  other = {
      "hidden": {"kernel": jnp.ones((10, 8)), "bias": jnp.ones(8)},
      "out": {"kernel": jnp.ones((8, 3)), "bias": jnp.ones(3)},
  }
  with pytest.raises(ValueError, match="do not match the pruning state"):
    tx.update(other, state, other)
  with pytest.raises(ValueError, match="do not match the pruning state"):
    tx.update({"x": jnp.ones((2, 2))}, state, {"x": jnp.ones((2, 2))})
  with pytest.raises(ValueError, match="params"):
    tx.update(_mlp_params(), state)


@pytest.mark.parametrize(
    "factory,match",
    [
        (lambda: flipout.gradient_noise(-1.0), "scale must be >= 0"),
        (lambda: flipout.gradient_noise(1.0, seed=1.5), "seed must be an int"),
        (lambda: flipout.prune_below(-0.1, step=3), "threshold must be >= 0"),
        (lambda: flipout.prune_below(0.1, step=0), "step must be a positive"),
        (lambda: flipout.fixed_masks({"w": None}), "masks"),
        (lambda: flipout.fixed_masks({"w": jnp.ones((2, 2))}), "bool"),
    ],
)
def test_other_transforms_refuse_bad_arguments(factory, match):
  with pytest.raises((ValueError, TypeError), match=match):
    factory()


def _every_third_masks(params):
  return jax.tree.map(
      lambda w: (jnp.arange(w.size).reshape(w.shape) % 3 == 0) if w.ndim == 2 else None, params
  )


def test_fixed_masks_without_flip_counts_train_the_same_weights():
  params = _mlp_params()
  masks = _every_third_masks(params)
  counted, counted_state, _ = _train(
      optax.chain(optax.adam(1e-2), flipout.fixed_masks(masks)), steps=20, params=params
  )
  uncounted, state, leaked = _train(
      optax.chain(optax.adam(1e-2), flipout.fixed_masks(masks, count_flips=False)),
      steps=20,
      params=params,
  )
  assert np.all(leaked == 0.0)
  assert state[1].flips is None and flipout.flip_counts(state) is None
  assert flipout.flip_counts(counted_state) is not None
  jax.tree.map(np.testing.assert_array_equal, uncounted, counted)


def test_fixed_masks_refuses_a_count_flips_that_is_not_a_bool():
  with pytest.raises(TypeError, match="count_flips must be a bool"):
    flipout.fixed_masks(_every_third_masks(_mlp_params()), count_flips=1)
