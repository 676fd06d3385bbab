"""prune against the NumPy reference (tests/reference.py), step by step, bit for bit.

The reference is written from the project's algorithm document, docs/algorithm.md,
checked against the specification.
"""

import contextlib
import zlib

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import flipout_jax as flipout
from flipout_jax._src import select
from tests import jaxpr_equations, reference

SHAPES = {"conv": (3, 3, 2, 4), "dense": (12, 5), "head": (5, 3)}


def _params(seed, dtype=np.float32):
  rng = np.random.default_rng(seed)
  params = {
      name: {
          "kernel": rng.normal(size=shape).astype(dtype),
          "bias": rng.normal(size=shape[-1]).astype(dtype),
      }
      for name, shape in SHAPES.items()
  }
  return params


def _updates(seed, steps, scale=0.6, dtype=np.float32):
  rng = np.random.default_rng(seed + 1000)
  return [
      {
          name: {
              "kernel": (scale * rng.normal(size=shape)).astype(dtype),
              "bias": (scale * rng.normal(size=shape[-1])).astype(dtype),
          }
          for name, shape in SHAPES.items()
      }
      for _ in range(steps)
  ]


def _updates_hitting_zero(seed, steps, dtype=np.float32):
  """Updates that land about a fifth of the weights on exactly 0.0 each step.

  Some weights sitting on 0.0 stay there (no flip), the others move off it
  again (a flip, since sign(0) = 0). A live weight follows the raw sum of its
  updates, so ``u = -w`` of that sum lands it on 0.0 in the library too.
  """
  rng = np.random.default_rng(seed + 2000)
  updates = _updates(seed, steps, dtype=dtype)
  weights = {name: _params(seed, dtype)[name]["kernel"] for name in SHAPES}
  for step_updates in updates:
    for name, w in weights.items():
      u = step_updates[name]["kernel"]
      hit = rng.random(w.shape) < 0.2
      u[hit] = -w[hit]
      u[(w == 0) & (rng.random(w.shape) < 0.5)] = 0
      weights[name] = (w + u).astype(dtype)
  return updates


def _kernels(tree):
  return [np.asarray(tree[name]["kernel"]) for name in sorted(SHAPES)]


def _precision(dtype):
  """float64 params need jax_enable_x64 (else JAX would make them float32)."""
  return jax.enable_x64(True) if np.dtype(dtype) == np.float64 else contextlib.nullcontext()


def _prune_like_reference(
    target=None,
    total_steps=None,
    prune_every=None,
    rate=0.5,
    p=2.0,
    criterion="flipout",
    seed=0,
    **rest,
):
  """``flipout.prune`` with the schedule and criterion the reference's keywords describe."""
  if criterion == "flipout":
    criterion = flipout.flipout_criterion(p)
  elif criterion == "random":
    criterion = flipout.random_criterion(seed)
  schedule = flipout.halving(rate=rate, every=prune_every)
  return flipout.prune(
      target, total_steps=total_steps, schedule=schedule, criterion=criterion, **rest
  )


def _run_and_compare(
    tx, steps, data_seed=0, *, dtype=np.float32, params=None, updates=None, **kwargs
):
  """Runs ``tx`` and the reference on the same updates; compares after every step."""
  params = _params(data_seed, dtype) if params is None else params
  updates = _updates(data_seed, steps, dtype=dtype) if updates is None else updates
  state = tx.init(params)
  step_fn = jax.jit(tx.update)
  expected = reference.simulate(_kernels(params), [_kernels(u) for u in updates], **kwargs)
  events_seen = 0
  bias = params["head"]["bias"]
  for step, (u, (want_w, want_m, want_f)) in enumerate(zip(updates, expected), start=1):
    new_updates, state = step_fn(u, state, params)
    params = optax.apply_updates(params, new_updates)
    got_masks = _kernels(flipout.masks(state))
    events_seen += any((~m).any() for m in got_masks)
    for got, want in zip(_kernels(params), want_w):
      assert got.dtype == want.dtype == np.dtype(dtype)
      np.testing.assert_array_equal(got, want, err_msg=f"weights at step {step}")
    for got, want in zip(got_masks, want_m):
      np.testing.assert_array_equal(got, want, err_msg=f"masks at step {step}")
    for got, want in zip(_kernels(flipout.flip_counts(state)), want_f):
      np.testing.assert_array_equal(got, want, err_msg=f"flips at step {step}")
    # Biases are never masked: they follow the raw updates.
    bias = (bias + u["head"]["bias"]).astype(dtype)
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
@pytest.mark.parametrize("flip_count_dtype", [None, "int32"])
def test_target_mode_matches_reference(criterion, p, target, flip_count_dtype):
  tx = _prune_like_reference(
      target, total_steps=40, p=p, criterion=criterion, flip_count_dtype=flip_count_dtype
  )
  _, state = _run_and_compare(tx, 40, target=target, total_steps=40, p=p, criterion=criterion)
  stored = state.flips["conv"]["kernel"].dtype
  assert stored == (jnp.uint16 if flip_count_dtype is None else jnp.int32)


@pytest.mark.parametrize(
    "rate,target,total_steps",
    [
        (0.5, None, None),
        (0.3, 0.7, 38),
        # total_steps a multiple of prune_every: no event at the last step (36),
        # nor after it (42) although the run goes on to step 44.
        (0.5, None, 36),
        (0.3, 0.95, 42),
    ],
)
def test_rate_mode_matches_reference(rate, target, total_steps):
  tx = flipout.prune(target, total_steps=total_steps, schedule=flipout.halving(rate=rate, every=6))
  _run_and_compare(tx, 44, target=target, prune_every=6, rate=rate, total_steps=total_steps)


def _largest_flips_first(params, flips):
  return jax.tree.map(lambda w, f: f.astype(jnp.float32) - jnp.abs(w), params, flips)


def _largest_flips_first_numpy(weights, flips):
  return [f.astype(np.float32) - np.abs(w) for w, f in zip(weights, flips)]


@pytest.mark.parametrize(
    "criterion", ["flipout", "global_magnitude", "magnitude", "random", "callable"]
)
def test_every_criterion_in_rate_mode_matches_reference(criterion):
  library, numpy = criterion, criterion
  if criterion == "callable":
    library, numpy = _largest_flips_first, _largest_flips_first_numpy
  kwargs = dict(target=0.9, prune_every=5, rate=0.4, total_steps=30, seed=3)
  tx = _prune_like_reference(criterion=library, **kwargs)
  _run_and_compare(tx, 32, criterion=numpy, **kwargs)


@pytest.mark.parametrize("seed", [0, 5])
def test_random_criterion_ranks_globally_like_reference(seed):
  # Three prunable leaves: the lowest draws are taken across all of them.
  tx = flipout.prune(0.9, total_steps=40, criterion=flipout.random_criterion(seed=seed))
  _run_and_compare(tx, 40, seed, target=0.9, total_steps=40, criterion="random", seed=seed)


@pytest.mark.parametrize(
    "schedule",
    [dict(target=0.9, total_steps=30), dict(prune_every=4, rate=0.3, total_steps=28)],
)
@pytest.mark.parametrize("p", [1.0, 2.0])
def test_weights_landing_on_exact_zero_match_reference(schedule, p):
  # sign(0) = 0: landing on 0.0 and leaving it are flips, staying on it is not.
  tx = _prune_like_reference(p=p, **schedule)
  kwargs = schedule
  _run_and_compare(tx, 30, updates=_updates_hitting_zero(0, 30), p=p, **kwargs)


def _frozen_conv(dtype, values):
  """Params and updates whose conv kernel holds ``values`` and never moves."""
  params = _params(1, dtype)
  params["conv"]["kernel"] = np.asarray(values, dtype).reshape(SHAPES["conv"])
  updates = _updates(1, 30, dtype=dtype)
  for u in updates:
    u["conv"]["kernel"][...] = 0
  return params, updates


# float16: the conv weights (1e-6 .. 1e-4) have squares that are 0 in float16,
# so they are ranked right only if scores are float32; float64: their scores
# are equal in float32, so they are ranked right only if compared as float64.
_FROZEN_CONV = {
    np.float16: np.random.default_rng(0).permutation(np.geomspace(1e-6, 1e-4, 72)),
    np.float64: 1e-3 * (1 + 1e-12 * np.arange(72)[::-1]),
    jnp.bfloat16: None,
}


@pytest.mark.parametrize(
    "dtype", [jnp.bfloat16, np.float16, np.float64], ids=lambda d: np.dtype(d).name
)
@pytest.mark.parametrize(
    "schedule",
    [
        dict(target=0.9, total_steps=30, rate=0.3),
        dict(prune_every=6, rate=0.3, total_steps=30),
    ],
)
@pytest.mark.parametrize("criterion", ["flipout", "global_magnitude"])
def test_low_and_high_precision_params_match_reference(dtype, schedule, criterion):
  kwargs = schedule
  with _precision(dtype):
    tx = _prune_like_reference(criterion=criterion, **schedule)
    if _FROZEN_CONV[dtype] is None:
      params, updates = _params(1, dtype), _updates(1, 30, dtype=dtype)
    else:
      params, updates = _frozen_conv(dtype, _FROZEN_CONV[dtype])
    _run_and_compare(
        tx, 30, dtype=dtype, params=params, updates=updates, criterion=criterion, **kwargs
    )


def test_paper_schedule_table():
  # docs/algorithm.md, "Schedules" (the paper's table): E = 350, f = 117, 70, 50, 39, 32.
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
  tx = flipout.prune(
      total_steps=21, schedule=flipout.halving(rate=0.5, every=5)
  )  # events at 5, 10, 15, 20
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
  names = {eqn.primitive.name for eqn in jaxpr_equations.equations(jaxpr.jaxpr)}
  assert "cond" in names and "sort" not in names and "top_k" not in names, names


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
    tx = flipout.prune(
        total_steps=5,
        criterion=flipout.random_criterion(seed=seed),
        schedule=flipout.halving(rate=0.5, every=2),
    )
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


def test_random_criterion_has_its_own_stream():
  # Its draws come from fold_in(fold_in(key(seed), tag), step), not from the
  # fold_in(key(seed), step) that gradient noise and data pipelines also use.
  rng = np.random.default_rng(0)
  params = {"a": jnp.asarray(rng.normal(size=(6, 7)), jnp.float32), "b": jnp.ones((4, 5))}

  def live_after_first_event(seed):
    tx = flipout.prune(
        criterion=flipout.random_criterion(seed=seed), schedule=flipout.halving(rate=0.5, every=3)
    )
    state, p = tx.init(params), params
    for _ in range(3):
      updates, state = jax.jit(tx.update)(jax.tree.map(jnp.zeros_like, p), state, p)
      p = optax.apply_updates(p, updates)
    return np.concatenate([np.asarray(m).ravel() for m in jax.tree.leaves(flipout.masks(state))])

  def live_if_drawn_from(key):
    scores = flipout.random_scores(params, None, key=key)
    flat = np.concatenate([np.asarray(s).ravel() for s in jax.tree.leaves(scores)])
    live = np.ones(flat.size, bool)
    live[np.argsort(flat, kind="stable")[: flat.size // 2]] = False
    return live

  seed, tag = 11, zlib.crc32(b"flipout_jax/random_criterion") & 0x7FFFFFFF
  live = live_after_first_event(seed)
  np.testing.assert_array_equal(live, live_after_first_event(seed))  # deterministic
  assert (live != live_after_first_event(seed + 1)).any()
  base = jax.random.key(seed)
  np.testing.assert_array_equal(
      live, live_if_drawn_from(jax.random.fold_in(jax.random.fold_in(base, tag), 3))
  )
  assert (live != live_if_drawn_from(jax.random.fold_in(base, 3))).any()


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


@pytest.mark.parametrize("total_steps,bytes_per_weight", [(10, 3), (10**6, 5)])
def test_state_bytes_per_prunable_weight(total_steps, bytes_per_weight):
  # A bool mask and a uint16 counter while the last event is at step 65535 or
  # earlier (here step 8), an int32 counter otherwise (step 800,000).
  params = {
      "conv": {"kernel": jnp.ones((3, 3, 16, 32)), "bias": jnp.ones(32)},
      "bn": {"scale": jnp.ones(32)},
  }
  state = jax.eval_shape(flipout.prune(0.9, total_steps=total_steps).init, params)
  state_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves((state.masks, state.flips)))
  assert state_bytes == bytes_per_weight * 3 * 3 * 16 * 32
  assert state.masks["conv"]["bias"] is None and state.flips["bn"]["scale"] is None
  # Reading an abstract state (jax.eval_shape) works too.
  assert flipout.masks(state)["conv"]["kernel"].shape == (3, 3, 16, 32)


@pytest.mark.parametrize("fraction", [0.0, 1e-6, 0.3, 0.5, 0.999, 1.0])
def test_lowest_k_on_large_arrays_uses_exact_counts(fraction):
  # Large leaves (summed by rows of 32, keys recomputed in every pass); k = 0
  # and k = N are the ends of the bisection's range.
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
