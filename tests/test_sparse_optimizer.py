"""Tests of SparseOptimizer: masks, in-graph prune-and-grow, slots, errors."""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf
from hypothesis import given, settings, strategies as st

import keras_freetickets as kft
from keras_freetickets import distributions

SETTINGS = dict(deadline=None, max_examples=8, derandomize=True)


def mlp(sizes=(20, 32, 16, 3), seed=0):
    keras.utils.set_random_seed(seed)
    layers = [keras.Input((sizes[0],))]
    for width in sizes[1:-1]:
        layers.append(keras.layers.Dense(width, activation="relu"))
    layers.append(keras.layers.Dense(sizes[-1]))
    return keras.Sequential(layers)


def data(n=256, features=20, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, features)).astype("float32")
    y = x[:, :classes].argmax(1).astype("int64")
    return x, y


def compile_sparse(model, inner=None, **kwargs):
    inner = inner or keras.optimizers.SGD(0.05, momentum=0.9)
    opt = kft.SparseOptimizer(inner, **kwargs)
    model.compile(
        optimizer=opt,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return opt


def reference_update(weights, mask, grow_score, fraction):
    """Numpy prune-and-grow written from the method's definition."""
    w, m, g = weights.ravel(), mask.ravel().astype(bool), grow_score.ravel()
    n_active = int(m.sum())
    k = int(math.floor(fraction * n_active + 0.5))
    active = np.flatnonzero(m)
    order = active[np.argsort(np.abs(w[active]), kind="stable")]
    kept = m.copy()
    kept[order[:k]] = False
    candidates = np.flatnonzero(~kept)
    grow_order = candidates[np.argsort(-g[candidates], kind="stable")]
    new = kept.copy()
    new[grow_order[:k]] = True
    grown = np.zeros_like(m)
    grown[grow_order[:k]] = True
    return new.reshape(mask.shape), grown.reshape(mask.shape), kept.reshape(
        mask.shape
    )


# --------------------------------------------------------------- init / masks
def test_initial_masks_have_exact_counts_and_zero_kernels():
    model = mlp((30, 40, 20, 5))
    opt = compile_sparse(model, sparsity=0.7)
    opt.build(model.trainable_variables)
    shapes = {v.path: tuple(v.shape) for v in model.trainable_variables
              if v.name == "kernel"}
    expected = distributions.resolve_counts(
        shapes, distributions.compute_sparsities(shapes, 0.7, "erk")
    )
    masks = opt.get_masks()
    assert set(masks) == set(shapes)
    by_path = {v.path: v.numpy() for v in model.trainable_variables}
    for path, mask in masks.items():
        assert mask.shape == shapes[path]
        assert int(mask.sum()) == expected[path]
        assert np.all(by_path[path][mask == 0] == 0)
    assert opt.check_invariants() == []
    for v in model.trainable_variables:  # biases are never masked
        if v.name == "bias":
            assert v.path not in masks


def test_masks_depend_on_seed_only():
    def masks(seed):
        keras.backend.clear_session()
        model = mlp()
        opt = compile_sparse(model, sparsity=0.8, seed=seed)
        opt.build(model.trainable_variables)
        return opt.get_masks()

    a, b, c = masks(0), masks(0), masks(1)
    for path in a:
        np.testing.assert_array_equal(a[path], b[path])
    assert any(not np.array_equal(a[p], c[p]) for p in a if a[p].min() == 0)


@settings(**SETTINGS)
@given(
    n_in=st.integers(2, 40),
    n_out=st.integers(2, 40),
    sparsity=st.floats(0.05, 0.95),
    fraction=st.floats(0.05, 1.0),
    grow=st.sampled_from(["gradient", "random"]),
)
def test_update_matches_reference_and_keeps_counts(
    n_in, n_out, sparsity, fraction, grow
):
    """One traced update on a random layer: exact counts, reference masks,
    grown weights and slots at zero, zeros outside the mask."""
    keras.backend.clear_session()
    keras.utils.set_random_seed(1)
    layer = keras.layers.Dense(n_out, use_bias=False)
    layer.build((None, n_in))
    inner = keras.optimizers.SGD(0.0, momentum=0.9)
    opt = kft.SparseOptimizer(
        inner, sparsity=sparsity, distribution="uniform", grow=grow,
        drop_fraction=fraction, update_interval=1, update_start_step=0,
    )
    opt.build([layer.kernel])
    if not opt.sparse_layers:  # rounding made the layer dense
        assert opt.get_masks()[layer.kernel.path].min() == 1
        return
    sparse = opt.sparse_layers[0]
    momentum = [s for s, _ in sparse.slots][0]
    rng = np.random.default_rng(n_in * 100 + n_out)
    # Give active weights and their momentum distinct nonzero values.
    old_mask = sparse.mask.numpy()
    layer.kernel.assign(
        np.where(old_mask, rng.normal(size=old_mask.shape), 0).astype("float32")
    )
    momentum.assign(np.where(old_mask, 1.0, 0.0).astype("float32"))
    before = layer.kernel.numpy()
    grad = rng.normal(size=old_mask.shape).astype("float32")

    @tf.function
    def step(g):
        opt.apply([g], [layer.kernel])

    step(tf.constant(grad))
    new_mask = sparse.mask.numpy()
    kernel = layer.kernel.numpy()
    assert int(new_mask.sum()) == sparse.num_active
    assert np.all(kernel[~new_mask] == 0)
    # lr = 0: the inner step only adds the decayed momentum (0.9) to the
    # active weights; the update then ranks those weights.
    after_inner = before + np.where(old_mask, np.float32(0.9), 0)
    if grow == "gradient":
        ref_new, ref_grown, ref_kept = reference_update(
            after_inner, old_mask, np.abs(grad), fraction
        )
        np.testing.assert_array_equal(new_mask, ref_new)
        assert np.all(kernel[ref_grown] == 0)
        np.testing.assert_allclose(kernel[ref_kept], after_inner[ref_kept])
        slots = momentum.numpy()
        assert np.all(slots[~ref_kept] == 0)
        np.testing.assert_allclose(slots[ref_kept], 0.9)
    k = int(math.floor(fraction * sparse.num_active + 0.5))
    assert int(np.sum(old_mask & ~new_mask)) <= k
    assert int(opt.mask_updates.numpy()) == 1
    ever = sparse.ever_active.numpy()
    np.testing.assert_array_equal(ever, old_mask | new_mask)


def test_random_growth_is_keyed_by_seed_layer_and_step():
    def run(seed, steps):
        keras.backend.clear_session()
        keras.utils.set_random_seed(3)
        layer = keras.layers.Dense(30, use_bias=False)
        layer.build((None, 30))
        opt = kft.SparseOptimizer(
            keras.optimizers.SGD(0.0), sparsity=0.8, distribution="uniform",
            grow="random", update_interval=1, update_start_step=0, seed=seed,
        )
        opt.build([layer.kernel])
        opt.sparse_layers[0].mask.assign(opt.sparse_layers[0].mask.numpy())
        fn = tf.function(lambda: opt.apply([tf.zeros((30, 30))],
                                           [layer.kernel]))
        out = []
        for _ in range(steps):
            fn()
            out.append(opt.get_masks()[layer.kernel.path])
        return out

    a, b, c = run(0, 2), run(0, 2), run(5, 2)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[0], a[1])
    assert not np.array_equal(a[1], c[1])


# -------------------------------------------------------- training invariants
OPTIMIZERS = {
    "sgd": lambda: keras.optimizers.SGD(0.05, momentum=0.9, nesterov=True),
    "adam": lambda: keras.optimizers.Adam(0.01),
    "adamw": lambda: keras.optimizers.AdamW(0.01, weight_decay=0.01),
    "rmsprop": lambda: keras.optimizers.RMSprop(0.01, momentum=0.5,
                                                centered=True),
    "nadam": lambda: keras.optimizers.Nadam(0.01),
    "lion": lambda: keras.optimizers.Lion(0.001),
    "adagrad": lambda: keras.optimizers.Adagrad(0.05),
    "adadelta": lambda: keras.optimizers.Adadelta(1.0),
    "adamax": lambda: keras.optimizers.Adamax(0.01),
    "lamb": lambda: keras.optimizers.Lamb(0.01),
    "clipped_sgd": lambda: keras.optimizers.SGD(0.05, momentum=0.9,
                                                clipnorm=0.5),
}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_zeros_and_slots_hold_after_every_step(name):
    model = mlp()
    opt = compile_sparse(model, inner=OPTIMIZERS[name](), sparsity=0.8,
                         update_interval=3)
    x, y = data(128)
    slot_names = set()
    for step in range(10):
        model.train_on_batch(x[step * 12:(step + 1) * 12 + 4],
                             y[step * 12:(step + 1) * 12 + 4])
        assert opt.check_invariants() == [], (name, step)
        for layer in opt.sparse_layers:
            mask = layer.mask.numpy()
            assert int(mask.sum()) == layer.num_active
            for slot, reset in layer.slots:
                slot_names.add(slot.name.rsplit("_", 1)[-1])
                values = slot.numpy()
                np.testing.assert_array_equal(
                    values[~mask], np.full((~mask).sum(), reset, np.float32)
                )
    assert int(opt.mask_updates.numpy()) == 3  # steps 3, 6, 9
    assert slot_names, "the slots of each optimizer must be found"


def test_update_window_and_cosine_schedule():
    model = mlp()
    opt = compile_sparse(
        model, sparsity=0.8, update_interval=2, update_start_step=4,
        update_end_step=10, drop_fraction_schedule="cosine",
    )
    x, y = data(64)
    counts = []
    for _ in range(14):
        model.train_on_batch(x[:16], y[:16])
        counts.append(int(opt.mask_updates.numpy()))
    # Updates at steps 4, 6, 8 only (step = iterations before the apply).
    assert counts == [0, 0, 0, 0, 1, 1, 2, 2, 3, 3, 3, 3, 3, 3]


def test_total_steps_sets_default_end():
    opt = kft.SparseOptimizer(keras.optimizers.SGD(0.1), total_steps=1000,
                              update_interval=10)
    assert opt.update_end_step == 750
    assert opt.update_start_step == 10


def test_callable_schedule_is_traced():
    model = mlp()
    opt = compile_sparse(
        model, sparsity=0.8, update_interval=1, update_start_step=1,
        drop_fraction_schedule=lambda step: tf.where(step < 2, 0.5, 0.0),
    )
    x, y = data(32)
    model.train_on_batch(x, y)
    model.train_on_batch(x, y)  # step 1: p = 0.5
    first = {p: m.copy() for p, m in opt.get_masks().items()}
    model.train_on_batch(x, y)  # step 2: p = 0, nothing moves
    for path, mask in opt.get_masks().items():
        np.testing.assert_array_equal(mask, first[path])
    assert int(opt.mask_updates.numpy()) == 2


def test_global_exploration_drops_the_requested_fraction():
    model = mlp((20, 64, 3))
    opt = compile_sparse(model, sparsity=0.8, drop_fraction=0.1,
                         update_interval=1000, grow="random")
    opt.enable_global_exploration()
    x, y = data(32)
    model.train_on_batch(x, y)
    before = opt.get_masks()
    opt.schedule_global_exploration(int(opt.iterations.numpy()), 0.8)
    model.train_on_batch(x, y)
    after = opt.get_masks()
    layer = opt.sparse_layers[0]
    moved = int(np.sum((before[layer.path] == 1) & (after[layer.path] == 0)))
    k = int(math.floor(0.8 * layer.num_active + 0.5))
    # Random regrowth may pick back a few of the dropped weights.
    assert 0.8 * k <= moved <= k
    assert int(after[layer.path].sum()) == layer.num_active
    assert opt.check_invariants() == []
    model.train_on_batch(x, y)  # not repeated on the next step
    np.testing.assert_array_equal(opt.get_masks()[layer.path], after[layer.path])


def test_update_stop_step_pauses_local_updates():
    model = mlp()
    opt = compile_sparse(model, sparsity=0.8, update_interval=1,
                         update_start_step=1)
    x, y = data(32)
    model.train_on_batch(x, y)
    opt.set_update_stop_step(2)
    for _ in range(4):
        model.train_on_batch(x, y)
    assert int(opt.mask_updates.numpy()) == 1
    opt.set_update_stop_step(None)
    model.train_on_batch(x, y)
    assert int(opt.mask_updates.numpy()) == 2


def test_fit_with_jit_and_steps_per_execution():
    model = mlp()
    opt = kft.SparseOptimizer(keras.optimizers.Adam(0.01), sparsity=0.9,
                              update_interval=5)
    model.compile(opt, keras.losses.SparseCategoricalCrossentropy(True),
                  jit_compile=True, steps_per_execution=3)
    x, y = data(480)
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    assert int(opt.iterations.numpy()) == 30
    assert int(opt.mask_updates.numpy()) == 5  # steps 5, 10, ..., 25
    assert opt.check_invariants() == []


@pytest.mark.parametrize("inner", ["momentum", "adam", "mixed_float16"])
def test_xla_step_with_kernel_updates_inside_the_cond_trains_the_same(
        monkeypatch, inner):
    """Under XLA the sparse kernels' own updates run inside both branches
    of the mask-update `cond` (`_rewiring.StepUpdates`); the weights, slots,
    masks and counts match the layout where they run before it, bit for
    bit, over ordinary and update steps (RigL and a global exploration),
    also inside a `LossScaleOptimizer` under mixed precision."""
    from keras_freetickets import _rewiring

    seen = []
    real = _rewiring.StepUpdates.defers_inner_updates

    def defers(self):
        seen.append(real(self))
        return seen[-1]

    monkeypatch.setattr(_rewiring.StepUpdates, "defers_inner_updates", defers)

    def run(defer):
        monkeypatch.setattr(_rewiring, "DEFER_INNER_UPDATES_UNDER_XLA", defer)
        seen.clear()
        optimizer = (keras.optimizers.Adam(0.01) if inner == "adam"
                     else keras.optimizers.SGD(0.05, momentum=0.9))
        opt = kft.SparseOptimizer(optimizer, sparsity=0.8, update_interval=3,
                                  grow="gradient", seed=1)
        if inner == "mixed_float16":
            keras.mixed_precision.set_global_policy("mixed_float16")
        try:
            model = mlp()
        finally:
            keras.mixed_precision.set_global_policy("float32")
        model.compile(keras.optimizers.LossScaleOptimizer(opt)
                      if inner == "mixed_float16" else opt,
                      keras.losses.SparseCategoricalCrossentropy(True),
                      jit_compile=True)
        x, y = data(160)
        opt.schedule_global_exploration(7, opt.drop_fraction)  # and at step 7
        model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
        assert seen and set(seen) == {defer}  # each sparse kernel, when traced
        return model, opt

    model_a, opt_a = run(True)
    model_b, opt_b = run(False)
    assert int(opt_a.mask_updates.numpy()) == int(opt_b.mask_updates.numpy()) >= 3
    masks_a, masks_b = opt_a.get_masks(), opt_b.get_masks()  # two models' paths
    assert len(masks_a) == len(masks_b) == 3
    for a, b in zip(masks_a.values(), masks_b.values()):
        np.testing.assert_array_equal(a, b)
    assert opt_a.check_invariants() == [] and opt_b.check_invariants() == []
    for a, b in zip(model_a.weights + opt_a.inner_optimizer.variables,
                    model_b.weights + opt_b.inner_optimizer.variables):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=b.path)


def test_first_fit_builds_eagerly_and_traces_each_update_once(monkeypatch):
    """Without a strategy Keras builds the optimizer inside the first train
    step and TensorFlow traces that step twice. The build runs eagerly and
    each layer's update is traced once, into a function both traces call
    (the first step's cost, benchmarks/end_to_end.py)."""
    from keras_freetickets import _rewiring

    eager_builds, traced = [], []
    real_build, real_update = kft.SparseOptimizer.build, _rewiring.update_layer

    def build(self, var_list):
        eager_builds.append(tf.executing_eagerly())
        return real_build(self, var_list)

    def update_layer(opt, layer, *args):
        traced.append(layer.index)
        return real_update(opt, layer, *args)

    monkeypatch.setattr(kft.SparseOptimizer, "build", build)
    monkeypatch.setattr(_rewiring, "update_layer", update_layer)
    model = mlp()
    opt = compile_sparse(model, sparsity=0.8, update_interval=2, seed=0)
    x, y = data(64)
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    assert eager_builds == [True]
    assert sorted(traced) == list(range(len(opt.get_masks())))
    assert int(opt.mask_updates.numpy()) >= 1  # the traced program ran
    assert opt.check_invariants() == []


def _top_level_conds(model, x, y):
    """If ops in one traced train step, not counting those nested in a
    branch or a called function."""
    step = tf.function(model.train_step, autograph=False)
    graph = step.get_concrete_function((tf.constant(x), tf.constant(y))).graph
    return sum(op.type in ("If", "StatelessIf") for op in graph.get_operations())


def test_one_cond_runs_every_layers_update_with_the_same_result(monkeypatch):
    """Without a strategy the layers' mask updates run in one `tf.cond`
    (one untaken branch per ordinary step, not one per kernel). Local
    updates and a global exploration that draws its grown weights (it reads
    the step counter) leave kernels, masks, slots and records bit for bit
    as the per-kernel conds do."""
    from keras_freetickets import _rewiring

    x, y = data(128)
    runs = []
    for batched in (True, False):
        if not batched:  # as under a strategy: a cond per kernel
            real_init = _rewiring.StepUpdates.__init__

            def per_kernel(self, *args):
                real_init(self, *args)
                self.expected = 0

            monkeypatch.setattr(_rewiring.StepUpdates, "__init__", per_kernel)
        model = mlp()
        opt = compile_sparse(model, sparsity=0.8, update_interval=3, seed=0,
                             global_exploration=True)
        opt.schedule_global_exploration(5, 0.8)
        opt.set_controls(global_grow_init=0.5)
        model.fit(x, y, batch_size=16, epochs=1, verbose=0, shuffle=False)
        assert int(opt.mask_updates.numpy()) == 3  # steps 3, 5, 6
        assert opt.check_invariants() == []
        state = [v.numpy() for v in model.weights + opt.variables]
        runs.append((state, _top_level_conds(model, x[:16], y[:16])))
    (state, conds), (per_kernel_state, per_kernel_conds) = runs
    assert len(opt.sparse_layers) == 3
    assert per_kernel_conds - conds == len(opt.sparse_layers) - 1
    assert len(state) == len(per_kernel_state)
    for value, per_kernel in zip(state, per_kernel_state):
        np.testing.assert_array_equal(value, per_kernel)


def test_recompiling_for_xla_traces_the_update_again():
    """Outside XLA the selection gathers the keys in play (data-dependent
    shapes), which XLA cannot compile. A model recompiled with
    `jit_compile=True` gets the update traced again (TensorFlow keys a
    function's traces by XLA context), and its masks equal those of the
    same updates run without XLA."""
    x, y = data(64)
    runs = []
    for jit_after in (False, True):
        model = mlp()
        opt = compile_sparse(model, sparsity=0.8, update_interval=2, seed=0)
        model.fit(x, y, batch_size=16, epochs=1, verbose=0, shuffle=False)
        before = int(opt.mask_updates.numpy())
        model.compile(
            optimizer=opt, jit_compile=jit_after,
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        model.fit(x, y, batch_size=16, epochs=1, verbose=0, shuffle=False)
        assert int(opt.mask_updates.numpy()) > before > 0  # both fits
        assert opt.check_invariants() == []
        runs.append((int(opt.mask_updates.numpy()), opt.get_masks()))
    (updates, masks), (xla_updates, xla_masks) = runs
    assert updates == xla_updates
    assert len(masks) == len(xla_masks)
    for mask, xla_mask in zip(masks.values(), xla_masks.values()):
        np.testing.assert_array_equal(xla_mask, mask)


def test_overrides_keep_a_layer_dense_and_others_compensate():
    model = mlp((8, 64, 64, 3))
    first = model.layers[0].name
    opt = compile_sparse(model, sparsity=0.8, overrides={first: 0.0})
    opt.build(model.trainable_variables)
    masks = opt.get_masks()
    total = sum(m.size for m in masks.values())
    active = sum(m.sum() for m in masks.values())
    assert masks[model.layers[0].kernel.path].min() == 1
    assert abs(active / total - 0.2) < 0.01


def test_learning_rate_and_iterations_delegate():
    inner = keras.optimizers.SGD(0.05)
    opt = kft.SparseOptimizer(inner)
    opt.learning_rate = 0.01
    assert float(inner.learning_rate.numpy()) == pytest.approx(0.01)
    assert opt.iterations is inner.iterations


def test_state_is_smaller_than_half_the_weights():
    model = mlp((784, 300, 100, 10))
    opt = compile_sparse(model, sparsity=0.8)
    opt.build(model.trainable_variables)
    weight_bytes = sum(v.numpy().nbytes for v in model.weights)
    assert opt.state_bytes() / weight_bytes <= 0.5


def test_get_config_round_trip():
    opt = kft.SparseOptimizer(
        keras.optimizers.Adam(0.003), sparsity=0.9, distribution="er",
        grow="random", drop_fraction=0.3, drop_fraction_schedule="cosine",
        update_interval=7, update_end_step=700, overrides={"dense": 0.5},
        seed=4, name="sparse_adam",
    )
    config = opt.get_config()
    clone = kft.SparseOptimizer.from_config(config)
    assert clone.get_config() == config
    assert isinstance(clone.inner_optimizer, keras.optimizers.Adam)
    restored = keras.optimizers.deserialize(keras.optimizers.serialize(opt))
    assert isinstance(restored, kft.SparseOptimizer)


# --------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "kwargs, needle",
    [
        (dict(sparsity=1.5), "sparsity=1.5"),
        (dict(sparsity=-0.1), "sparsity=-0.1"),
        (dict(sparsity=1.0), "sparsity=1.0"),
        (dict(drop_fraction=0.0), "drop_fraction=0.0"),
        (dict(drop_fraction=1.2), "drop_fraction=1.2"),
        (dict(update_interval=0), "update_interval=0"),
        (dict(update_interval=2.5), "update_interval=2.5"),
        (dict(distribution="gaussian"), "distribution='gaussian'"),
        (dict(grow="momentum"), "grow='momentum'"),
        (dict(drop_fraction_schedule="linear"),
         "drop_fraction_schedule='linear'"),
        (dict(drop_fraction_schedule="cosine"), "update_end_step=None"),
        (dict(update_start_step=10, update_end_step=5), "update_end_step=5"),
        (dict(overrides={"dense": 1.0}), "overrides['dense']=1.0"),
        (dict(seed=-1), "seed=-1"),
        (dict(clipnorm=1.0), "clipnorm"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, needle):
    with pytest.raises(ValueError, match=".*".join(
        map(__import__("re").escape, needle.split("*")))):
        kft.SparseOptimizer(keras.optimizers.SGD(0.1), **kwargs)


@pytest.mark.parametrize(
    "inner, needle",
    [
        (lambda: keras.optimizers.Adafactor(), "Adafactor"),
        (lambda: keras.optimizers.Muon(), "Muon"),
        (lambda: keras.optimizers.Ftrl(), "Ftrl"),
        (lambda: keras.optimizers.SGD(0.1, use_ema=True), "use_ema"),
        (lambda: keras.optimizers.SGD(0.1, gradient_accumulation_steps=2),
         "gradient_accumulation_steps"),
        (lambda: keras.optimizers.LossScaleOptimizer(
            keras.optimizers.SGD(0.1)), "LossScaleOptimizer"),
        (lambda: tf.Module(), "Keras 3 optimizer"),
        (lambda: "sgd", "inner_optimizer='sgd'"),
    ],
)
def test_unsupported_inner_optimizers_are_refused(inner, needle):
    with pytest.raises(ValueError, match=needle):
        kft.SparseOptimizer(inner())


def test_unknown_override_and_no_prunable_weights():
    model = mlp()
    opt = compile_sparse(model, overrides={"no_such_layer": 0.0})
    with pytest.raises(ValueError, match="no_such_layer"):
        opt.build(model.trainable_variables)
    keras.backend.clear_session()
    norm = keras.Sequential([keras.Input((4,)),
                             keras.layers.LayerNormalization()])
    opt = kft.SparseOptimizer(keras.optimizers.SGD(0.1))
    with pytest.raises(ValueError, match="no prunable weights"):
        opt.build(norm.trainable_variables)


def test_queries_before_build_fail_clearly():
    opt = kft.SparseOptimizer(keras.optimizers.SGD(0.1))
    with pytest.raises(ValueError, match="not built"):
        opt.get_masks()


def count_traces(model):
    """Counts the Python calls of `model.train_step`: one per trace."""
    traces = []
    train_step = model.train_step

    def counted(batch):
        traces.append(1)
        return train_step(batch)

    model.train_step = counted
    return traces


def test_first_fit_traces_the_train_step_once(monkeypatch):
    """Keras builds the optimizer inside the first trace; the wrapper's
    variables are made eagerly and unlifted, so `tf.function` keeps that
    trace instead of tracing the whole step again. With lifting left on
    (the creator scope made a no-op) the step is traced twice."""
    from keras_freetickets import _inner

    x, y = data(64)
    counts = []
    for lifting in (False, True):
        if lifting:
            monkeypatch.setattr(
                _inner, "_unlifted", lambda next_creator, **kw: next_creator(**kw)
            )
        model = mlp()
        opt = compile_sparse(model, sparsity=0.8, update_interval=2, seed=0)
        traces = count_traces(model)
        model.fit(x, y, batch_size=16, epochs=2, verbose=0, shuffle=False)
        assert int(opt.mask_updates.numpy()) > 0
        assert opt.check_invariants() == []
        counts.append(len(traces))
    assert counts == [1, 2]


def test_a_custom_loop_builds_in_its_first_trace_as_if_built_before():
    """`apply` first called inside a user's `tf.function`: one trace, and the
    same weights and optimizer state, bit for bit, as an optimizer built
    eagerly before the loop."""
    x, y = data(64)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    runs = []
    for prebuilt in (False, True):
        model = mlp()
        opt = kft.SparseOptimizer(
            keras.optimizers.SGD(0.05, momentum=0.9), sparsity=0.8,
            update_interval=2, seed=0,
        )
        if prebuilt:
            opt.build(model.trainable_variables)
        traces = []

        @tf.function
        def step(xb, yb):
            traces.append(1)
            with tf.GradientTape() as tape:
                loss = loss_fn(yb, model(xb, training=True))
            grads = tape.gradient(loss, model.trainable_variables)
            opt.apply(grads, model.trainable_variables)

        for i in range(4):
            step(x[16 * i:16 * (i + 1)], y[16 * i:16 * (i + 1)])
        assert len(traces) == 1
        assert int(opt.mask_updates.numpy()) > 0
        assert opt.check_invariants() == []
        runs.append([v.numpy() for v in model.trainable_variables + opt.variables])
    lazy, eager = runs
    assert len(lazy) == len(eager)
    for a, b in zip(lazy, eager):
        np.testing.assert_array_equal(a, b)
