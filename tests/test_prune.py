"""prune against the NumPy reference of docs/algorithm.md, step by step."""

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import flipout_jax as flipout
from flipout_jax._src import select
from tests import reference

SHAPES = {"conv": (3, 3, 2, 4), "dense": (12, 5), "head": (5, 3)}


def _params(seed):
  rng = np.random.default_rng(seed)
  params = {
      name: {
          "kernel": rng.normal(size=shape).astype(np.float32),
          "bias": rng.normal(size=shape[-1]).astype(np.float32),
      }
      for name, shape in SHAPES.items()
  }
  return params


def _updates(seed, steps, scale=0.6):
  rng = np.random.default_rng(seed + 1000)
  return [
      {
          name: {
              "kernel": (scale * rng.normal(size=shape)).astype(np.float32),
              "bias": (scale * rng.normal(size=shape[-1])).astype(np.float32),
          }
          for name, shape in SHAPES.items()
      }
      for _ in range(steps)
  ]


def _kernels(tree):
  return [np.asarray(tree[name]["kernel"]) for name in sorted(SHAPES)]


def _run_and_compare(tx, steps, seed=0, **reference_kwargs):
  params = _params(seed)
  updates = _updates(seed, steps)
  state = tx.init(params)
  step_fn = jax.jit(tx.update)
  expected = reference.simulate(
      _kernels(params), [_kernels(u) for u in updates], **reference_kwargs
  )
  events_seen = 0
  bias = _params(seed)["head"]["bias"]
  for step, (u, (want_w, want_m, want_f)) in enumerate(zip(updates, expected), start=1):
    new_updates, state = step_fn(u, state, params)
    params = optax.apply_updates(params, new_updates)
    got_masks = _kernels(flipout.masks(state))
    events_seen += any((~m).any() for m in got_masks)
    for got, want in zip(_kernels(params), want_w):
      np.testing.assert_array_equal(got, want, err_msg=f"weights at step {step}")
    for got, want in zip(got_masks, want_m):
      np.testing.assert_array_equal(got, want, err_msg=f"masks at step {step}")
    for got, want in zip(_kernels(flipout.flip_counts(state)), want_f):
      np.testing.assert_array_equal(got, want, err_msg=f"flips at step {step}")
    # Biases are never masked: they follow the raw updates.
    bias = bias + u["head"]["bias"]
    np.testing.assert_array_equal(params["head"]["bias"], bias)
  assert events_seen, "the run never pruned: the comparison proved nothing"
  return params, state


@pytest.mark.parametrize(
    "criterion,p,target",
    [
        ("flipout", 2.0, 0.9),
        ("flipout", 1.0, 0.75),
        ("global_magnitude", 2.0, 0.95),
        ("magnitude", 2.0, 0.8),
    ],
)
def test_target_mode_matches_reference(criterion, p, target):
  tx = flipout.prune(target, total_steps=40, p=p, criterion=criterion)
  _run_and_compare(tx, 40, target=target, total_steps=40, p=p, criterion=criterion)


@pytest.mark.parametrize("rate,target,total_steps", [(0.5, None, None), (0.3, 0.7, 38)])
def test_rate_mode_matches_reference(rate, target, total_steps):
  tx = flipout.prune(target, prune_every=6, rate=rate, total_steps=total_steps)
  _run_and_compare(tx, 40, target=target, prune_every=6, rate=rate, total_steps=total_steps)


def test_paper_schedule_table():
  # docs/algorithm.md (the paper's table): E = 350 epochs, f = 117, 70, 50, 39, 32 for 75% ... 99.90%.
  for target, interval in [
      (0.75, 117),
      (0.9375, 70),
      (0.984375, 50),
      (0.99609375, 39),
      (0.999, 32),
  ]:
    steps = flipout.event_steps(target, 350)
    assert steps[0] == interval and np.all(np.diff(steps) == interval)
  assert len(flipout.event_steps(0.999, 350)) == 10


@pytest.mark.parametrize("target", [0.5, 0.9, 0.98, 0.999, 0.3333])
def test_exact_target_sparsity(target):
  params = {
      "a": jnp.asarray(np.random.default_rng(1).normal(size=(97, 31)), jnp.float32),
      "b": jnp.asarray(np.random.default_rng(2).normal(size=(3, 3, 7, 11)), jnp.float32),
  }
  num_prunable = 97 * 31 + 3 * 3 * 7 * 11
  tx = flipout.prune(target, total_steps=60)
  state = tx.init(params)
  update = jax.jit(tx.update)
  for _ in range(60):
    updates, state = update(jax.tree.map(jnp.zeros_like, params), state, params)
    params = optax.apply_updates(params, updates)
  report = flipout.summary(params)
  assert report.size == num_prunable
  assert report.size - report.live == round(target * num_prunable)


def test_rate_mode_reproduces_paper_sparsity():
  params = {"w": jnp.asarray(np.random.default_rng(3).normal(size=(64, 64)), jnp.float32)}
  tx = flipout.prune(prune_every=5, rate=0.5, total_steps=21)  # events at 5, 10, 15, 20
  state = tx.init(params)
  update = jax.jit(tx.update)
  for _ in range(21):
    updates, state = update(jax.tree.map(jnp.zeros_like, params), state, params)
    params = optax.apply_updates(params, updates)
  assert flipout.sparsity(params) == 1 - 0.5**4


def test_whole_run_traces_once():
  traces = []
  tx = optax.chain(
      flipout.gradient_noise(1.0), optax.sgd(0.1, momentum=0.9), flipout.prune(0.9, total_steps=30)
  )
  params = _params(0)

  @jax.jit
  def step(params, state, batch_seed):
    traces.append(1)
    grads = jax.tree.map(lambda w: jax.random.normal(jax.random.key(batch_seed), w.shape), params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  state = tx.init(params)
  for i in range(30):
    params, state = step(params, state, i)
  assert len(traces) == 1
  assert flipout.sparsity(params) > 0.89


def test_event_uses_no_sort():
  params = {"w": jnp.ones((50, 40)), "v": jnp.ones((40, 3))}
  tx = flipout.prune(0.9, total_steps=20)
  jaxpr = jax.make_jaxpr(tx.update)(params, tx.init(params), params)
  text = str(jaxpr)
  assert "cond" in text and "sort" not in text and "top_k" not in text


def test_custom_criterion_prunes_lowest_scores():
  params = {"w": jnp.arange(1.0, 101.0).reshape(10, 10)}
  largest_first = lambda params, flips: jax.tree.map(lambda w: -jnp.abs(w), params)
  tx = flipout.prune(0.3, total_steps=4, criterion=largest_first)
  state = tx.init(params)
  update = jax.jit(tx.update)
  for _ in range(4):
    updates, state = update(jax.tree.map(jnp.zeros_like, params), state, params)
    params = optax.apply_updates(params, updates)
  live = np.asarray(flipout.masks(state)["w"]).ravel()
  np.testing.assert_array_equal(live, np.arange(100) < 70)


def test_random_criterion_prunes_exact_count_of_live_weights():
  params = {"w": jnp.asarray(np.random.default_rng(0).normal(size=(40, 50)), jnp.float32)}
  results = []
  for seed in (0, 1):
    tx = flipout.prune(prune_every=2, rate=0.5, total_steps=5, criterion="random", seed=seed)
    state = tx.init(params)
    p = params
    history = []
    update = jax.jit(tx.update)
    for _ in range(4):
      updates, state = update(jax.tree.map(jnp.zeros_like, p), state, p)
      p = optax.apply_updates(p, updates)
      history.append(np.asarray(flipout.masks(state)["w"]))
    assert history[1].sum() == 1000 and history[3].sum() == 500
    assert not (history[3] & ~history[1]).any(), "a pruned weight came back"
    results.append(history[3])
  assert (results[0] != results[1]).any()


def test_non_finite_weights_keep_exact_counts():
  weights = np.random.default_rng(0).normal(size=(20, 10)).astype(np.float32)
  weights[0, :5] = np.nan
  weights[1, :3] = np.inf
  weights[2, :2] = -np.inf
  params = {"w": jnp.asarray(weights)}
  tx = flipout.prune(0.9, total_steps=12)
  state = tx.init(params)
  update = jax.jit(tx.update)
  for _ in range(12):
    updates, state = update(jax.tree.map(jnp.zeros_like, params), state, params)
    params = optax.apply_updates(params, updates)
  live = np.asarray(flipout.masks(state)["w"])
  assert (~live).sum() == round(0.9 * 200)
  # Non-finite weights rank as the most salient, so they are the survivors.
  assert live[0, :5].all() and live[1, :3].all() and live[2, :2].all()


@hypothesis.settings(max_examples=25, deadline=None)
@hypothesis.given(
    values=st.lists(
        st.sampled_from([-1.5, -0.0, 0.0, 0.25, 0.5, 2.0, np.inf, np.nan]), min_size=24, max_size=24
    ),
    live=st.lists(st.booleans(), min_size=24, max_size=24),
    k_fraction=st.floats(0, 1),
)
def test_lowest_k_equals_stable_argsort(values, live, k_fraction):
  scores = np.asarray(values, np.float32)
  live = np.asarray(live)
  k = int(round(k_fraction * live.sum()))
  chosen = _lowest_k_split(jnp.asarray(scores), jnp.asarray(live), k)
  want = np.zeros(24, bool)
  want[reference._select_lowest(np.where(scores == 0, 0, scores), live, k)] = True
  np.testing.assert_array_equal(chosen, want)


@jax.jit
def _lowest_k_split(scores, live, k):
  # Two leaves, to exercise tie-breaking across leaves.
  keys = [
      select.sortable_keys(scores[:10], live[:10]),
      select.sortable_keys(scores[10:].reshape(2, 7), live[10:].reshape(2, 7)),
  ]
  first, second = select.lowest_k(keys, k)
  return jnp.concatenate([first, second.ravel()])


def test_state_is_five_bytes_per_prunable_weight():
  params = {
      "conv": {"kernel": jnp.ones((3, 3, 16, 32)), "bias": jnp.ones(32)},
      "bn": {"scale": jnp.ones(32)},
  }
  state = jax.eval_shape(flipout.prune(0.9, total_steps=10).init, params)
  state_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves((state.masks, state.flips)))
  assert state_bytes == 5 * 3 * 3 * 16 * 32
  assert state.masks["conv"]["bias"] is None and state.flips["bn"]["scale"] is None
  # Reading an abstract state (jax.eval_shape) works too.
  assert flipout.masks(state)["conv"]["kernel"].shape == (3, 3, 16, 32)


@pytest.mark.parametrize("fraction", [0.0, 1e-6, 0.3, 0.5, 0.999, 1.0])
def test_lowest_k_on_large_arrays_uses_exact_counts(fraction):
  # Above 1M keys a random sample narrows the search first; k = 0 and k = N
  # make the sampled bracket fail its check and exercise the full search.
  rng = np.random.default_rng(7)
  first = np.round(rng.normal(size=(700, 1000)), 2).astype(np.float32)  # many ties
  second = rng.standard_exponential(size=1_300_000).astype(np.float32)
  live = [rng.random(first.shape) < 0.9, np.ones(second.shape, bool)]
  k = int(round(fraction * (live[0].sum() + live[1].sum())))
  chosen = jax.jit(
      lambda a, b, la, lb, k: select.lowest_k(
          [select.sortable_keys(a, la), select.sortable_keys(b, lb)], k
      )
  )(first, second, live[0], live[1], k)
  want = np.zeros(first.size + second.size, bool)
  want[
      reference._select_lowest(
          np.concatenate([first.ravel(), second]), np.concatenate([live[0].ravel(), live[1]]), k
      )
  ] = True
  np.testing.assert_array_equal(
      np.concatenate([np.asarray(chosen[0]).ravel(), np.asarray(chosen[1])]), want
  )
