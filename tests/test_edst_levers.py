"""Each EDST diversity lever changes what it claims to, and the return rate
is what it says: tiny models, counts checked by hand."""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_freetickets as kft
from keras_freetickets import edst as edst_lib
from keras_freetickets import members as members_lib
from edst_helpers import small_model
from edst_helpers import toy_data


def compile_sparse(model, lr=0.05, **kwargs):
    kwargs.setdefault("update_interval", 5)
    opt = kft.SparseOptimizer(keras.optimizers.SGD(lr, momentum=0.9),
                              sparsity=0.8, **kwargs)
    model.compile(opt, keras.losses.SparseCategoricalCrossentropy(True))
    return opt


class StepRecorder(keras.callbacks.Callback):
    """Masks, the globally-dropped record and the lr after every step."""

    def __init__(self, opt):
        super().__init__()
        self.opt, self.masks, self.dropped, self.lr = opt, {}, {}, []

    def on_epoch_begin(self, epoch, logs=None):
        self.lr.append(float(self.opt.learning_rate.numpy()))

    def on_train_batch_end(self, batch, logs=None):
        step = int(self.opt.iterations.numpy())
        self.masks[step] = [l.mask.numpy() for l in self.opt.sparse_layers]
        self.dropped[step] = [l.dropped.numpy()
                              for l in self.opt.sparse_layers]


def run_edst(tmp_path, epochs=(1, 3), members=3, **levers):
    model = small_model()
    opt = compile_sparse(model)
    edst = kft.EDSTCallback(num_members=members, exploration_epochs=epochs[0],
                            refinement_epochs=epochs[1],
                            member_dir=tmp_path / "m", **levers)
    rec = StepRecorder(opt)
    x, y = toy_data()
    history = model.fit(x, y, batch_size=32, epochs=edst.total_epochs,
                        shuffle=False, callbacks=[edst, rec], verbose=0)
    return opt, edst, rec, history


STEPS = 20  # 640 examples / batch 32


# --------------------------------------------------------------- lr plans
@pytest.mark.parametrize("plan, height, first, last", [
    ("official", None, 0.1, 0.01),
    ("step", None, 1.0, 0.01),
    ("cosine", None, 1.0, 0.5 * (1 + math.cos(math.pi * 7 / 8))),
    ("cosine", 0.5, 0.5, 0.25 * (1 + math.cos(math.pi * 7 / 8))),
    ("official", 0.3, 0.3, 0.03),
])
def test_learning_rate_plans_restart_where_they_say(plan, height, first,
                                                     last):
    factors = [edst_lib.learning_rate_factor(plan, 1, e, 8, height)
               for e in range(8)]
    assert factors[0] == pytest.approx(first)
    assert factors[-1] == pytest.approx(last)
    assert all(a >= b for a, b in zip(factors, factors[1:]))
    assert edst_lib.learning_rate_factor(plan, 0, 3, 8, height) == 1.0


def test_restart_to_the_base_rate_sets_it_at_each_phase_start(tmp_path):
    _, edst, rec, _ = run_edst(tmp_path, epochs=(1, 2), members=2,
                               learning_rate_plan="cosine")
    # Epoch 0 explores at the base rate; each phase starts at it again.
    assert rec.lr[1] == pytest.approx(0.05) and rec.lr[3] == pytest.approx(
        0.05)
    assert rec.lr[2] == pytest.approx(0.025)  # cos(pi/2) half-way


# ------------------------------------------------------------- exclusion
def _regrown_after_global(rec, global_step, end_step):
    """Count of (step, layer) where a weight the global exploration removed
    is active again, between the exploration and `end_step`."""
    removed = rec.dropped[global_step + 1]
    back = 0
    for step in range(global_step + 2, end_step + 1):
        for mask, gone in zip(rec.masks[step], removed):
            back += int(np.sum(mask & gone))
    return back, sum(int(g.sum()) for g in removed)


def test_exclusion_keeps_globally_dropped_weights_out_for_the_phase(
    tmp_path,
):
    global_step = (1 + 3) * STEPS  # first step of the second refinement
    end = (1 + 6) * STEPS
    _, _, rec, _ = run_edst(tmp_path / "on", exclude_dropped=True)
    back, removed = _regrown_after_global(rec, global_step, end)
    assert removed > 0 and back == 0
    _, _, rec, _ = run_edst(tmp_path / "off", exclude_dropped=False,
                            global_grow="random")
    back, removed = _regrown_after_global(rec, global_step, end)
    assert back > 0, "without the exclusion RigL regrows some of them"


# --------------------------------------------------------- global growth
def test_global_grow_rule_changes_the_explored_mask(tmp_path):
    global_step = (1 + 3) * STEPS
    masks = {}
    for rule in ("random", "gradient"):
        opt, _, rec, _ = run_edst(tmp_path / rule, members=2,
                                  global_grow=rule)
        masks[rule] = rec.masks[global_step + 1]
        for mask, layer in zip(masks[rule], opt.sparse_layers):
            assert int(mask.sum()) == layer.num_active
    assert any(np.any(a != b) for a, b in zip(masks["random"],
                                               masks["gradient"]))


# ------------------------------------------------------ grown weights' start
class KernelRecorder(keras.callbacks.Callback):
    def __init__(self, opt, steps):
        super().__init__()
        self.opt, self.steps, self.kernels = opt, steps, {}

    def on_train_batch_end(self, batch, logs=None):
        step = int(self.opt.iterations.numpy())
        if step in self.steps:
            self.kernels[step] = [
                (l.variable.numpy(), l.mask.numpy())
                for l in self.opt.sparse_layers]


@pytest.mark.parametrize("init", ["zeros", "random"])
def test_global_grow_init_starts_grown_weights_at_zero_or_at_random(
    tmp_path, init
):
    global_step = (1 + 2) * STEPS
    model = small_model()
    opt = compile_sparse(model)
    edst = kft.EDSTCallback(num_members=2, exploration_epochs=1,
                            refinement_epochs=2, member_dir=tmp_path,
                            global_grow_init=init)
    rec = KernelRecorder(opt, {global_step, global_step + 1})
    x, y = toy_data()
    model.fit(x, y, batch_size=32, epochs=edst.total_epochs, shuffle=False,
              callbacks=[edst, rec], verbose=0)
    for (w0, m0), (w1, m1) in zip(rec.kernels[global_step],
                                  rec.kernels[global_step + 1]):
        grown = m1 & ~m0
        assert grown.sum() > 0
        assert np.all(w1[~m1] == 0)
        # lr is tiny at this step's update; the inner step moved grown
        # weights by at most lr * grad before the update set them.
        values = w1[grown]
        if init == "zeros":
            assert np.all(values == 0)
        else:
            rms = np.sqrt(np.mean(w0[m0] ** 2))
            assert np.count_nonzero(values) == values.size
            assert 0.7 * rms < np.sqrt(np.mean(values ** 2)) < 1.3 * rms


# --------------------------------------------------------------- novelty
def _local_update(novelty, ever_seed_steps=3):
    """One local update on a built optimizer with the novelty control set;
    returns (weights grown, weights that were ever active before it)."""
    keras.backend.clear_session()
    keras.utils.set_random_seed(0)
    layer = keras.layers.Dense(40, use_bias=False)
    layer.build((None, 30))
    opt = kft.SparseOptimizer(keras.optimizers.SGD(0.1), sparsity=0.8,
                              update_interval=1, update_start_step=1,
                              drop_fraction=0.5, global_exploration=True)
    opt.build([layer.kernel])
    rng = np.random.default_rng(0)

    @tf.function
    def step(g):
        opt.apply([g], [layer.kernel])

    for _ in range(ever_seed_steps):  # local updates fill ever_active
        step(tf.constant(rng.normal(size=(30, 40)).astype("float32")))
    sparse = opt.sparse_layers[0]
    opt.set_controls(novelty=novelty)
    before, ever = sparse.mask.numpy(), sparse.ever_active.numpy()
    step(tf.constant(rng.normal(size=(30, 40)).astype("float32")))
    grown = sparse.mask.numpy() & ~before
    assert int(sparse.mask.numpy().sum()) == sparse.num_active
    return grown, ever


def test_novelty_grows_never_active_weights_first():
    grown, ever = _local_update(novelty=1e6)
    assert grown.sum() > 0 and not np.any(grown & ever)
    grown, ever = _local_update(novelty=0.0)
    assert np.any(grown & ever), "without novelty used weights come back"


# ------------------------------------------------- refinement drop fraction
def test_refinement_drop_fraction_sets_the_local_update_size(tmp_path):
    model = small_model()
    opt = compile_sparse(model, drop_fraction=0.5, grow="random")
    edst = kft.EDSTCallback(num_members=2, exploration_epochs=1,
                            refinement_epochs=4, member_dir=tmp_path,
                            refinement_drop_fraction=0.2,
                            refinement_drop_decay="cosine")
    scales = []

    class Scale(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            scales.append(float(opt.local_drop_scale.numpy()))

    rec = StepRecorder(opt)
    x, y = toy_data()
    model.fit(x, y, batch_size=32, epochs=edst.total_epochs, shuffle=False,
              callbacks=[edst, Scale(), rec], verbose=0)
    expected = [0.2 * 0.5 * (1 + math.cos(math.pi * e / 4)) / 0.5
                for e in range(4)]
    np.testing.assert_allclose(scales, [1.0] + expected * 2, rtol=1e-6)
    # A local update in the exploration phase replaces p = 0.5 of a layer,
    # one at the start of a refinement phase 0.2: count the dropped weights.
    layer = opt.sparse_layers[0]
    moved = []
    for step, fraction in ((5, 0.5), (STEPS + 5, 0.2)):
        old, new = rec.masks[step][0], rec.masks[step + 1][0]
        moved.append(int(np.sum(old & ~new)))
        k = int(np.floor(fraction * layer.num_active + 0.5))
        # Random regrowth picks back about k * k / (n - active + k).
        assert 0.8 * k <= moved[-1] <= k
    assert moved[0] > 2 * moved[1]


# ------------------------------------------------------------ return rate
def test_return_rate_is_counted_by_hand():
    keras.backend.clear_session()
    layer = keras.layers.Dense(5, use_bias=False)
    layer.build((None, 4))
    opt = kft.SparseOptimizer(keras.optimizers.SGD(0.1), sparsity=0.5,
                              distribution="uniform",
                              global_exploration=True)
    opt.build([layer.kernel])
    sparse = opt.sparse_layers[0]
    assert opt.return_rates() is None  # no global exploration yet
    dropped = np.zeros((4, 5), bool)
    dropped[0, :4] = True  # 4 weights removed by "the" exploration
    mask = np.zeros((4, 5), bool)
    mask[0, :1] = True  # one of them is back ...
    mask[1:, :] = True  # ... and the rest of the mask is elsewhere
    mask.ravel()[np.flatnonzero(mask)[sparse.num_active:]] = False
    sparse.dropped.assign(dropped)
    sparse.mask.assign(mask)
    rates = opt.return_rates()
    assert rates["overall"] == pytest.approx(1 / 4)
    assert rates["layers"] == {sparse.path: pytest.approx(0.25)}


def test_return_rate_in_metadata_and_logs_matches_the_masks(tmp_path):
    opt, edst, rec, history = run_edst(tmp_path, global_grow="random")
    for index, phase_start in ((1, (1 + 3) * STEPS), (2, (1 + 6) * STEPS)):
        removed = rec.dropped[phase_start + 1]
        save_step = (1 + 3 * (index + 1)) * STEPS
        saved = rec.masks[save_step]
        back = sum(int(np.sum(m & r)) for m, r in zip(saved, removed))
        total = sum(int(r.sum()) for r in removed)
        meta = members_lib.read_member_metadata(
            members_lib.member_path(tmp_path / "m", index))
        assert meta["return_rate"] == pytest.approx(back / total)
        assert set(meta["return_rate_per_layer"]) == {
            l.path for l in opt.sparse_layers}
    assert "return_rate" not in members_lib.read_member_metadata(
        members_lib.member_path(tmp_path / "m", 0))
    logged = history.history["edst/return_rate"]
    assert len(logged) == 6  # the epochs of phases 2 and 3
    rates = [members_lib.read_member_metadata(members_lib.member_path(
        tmp_path / "m", i))["return_rate"] for i in (1, 2)]
    # The last epoch of each phase logs the rate its member was saved with.
    assert [logged[2], logged[5]] == pytest.approx(rates)
    assert all(0.0 <= r <= 1.0 for r in logged)


# ---------------------------------------------------------- construction
def test_levers_need_no_retrace_and_are_refused_clearly(tmp_path):
    model = small_model()
    opt = compile_sparse(model)
    x, y = toy_data(64)
    model.fit(x, y, epochs=1, verbose=0)  # built without global exploration
    with pytest.raises(ValueError, match="global_exploration=True"):
        model.fit(x, y, epochs=4, verbose=0, callbacks=[kft.EDSTCallback(
            num_members=2, exploration_epochs=0, refinement_epochs=2,
            member_dir=tmp_path)])
    assert opt.global_exploration is False


@pytest.mark.parametrize("kwargs, needle", [
    (dict(learning_rate_plan="linear"), "learning_rate_plan='linear'"),
    (dict(restart_height=0), "restart_height=0"),
    (dict(novelty=-1.0), "novelty=-1.0"),
    (dict(novelty=float("inf")), "novelty=inf"),
    (dict(exclude_dropped="yes"), "exclude_dropped='yes'"),
    (dict(refinement_drop_fraction=1.5), "refinement_drop_fraction=1.5"),
    (dict(refinement_drop_decay="linear"), "refinement_drop_decay='linear'"),
    (dict(global_grow_init="ones"), "global_grow_init='ones'"),
])
def test_bad_lever_arguments_name_the_argument(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        kft.EDSTCallback(member_dir="m", **kwargs)


def test_levers_round_trip_and_a_callable_plan_is_refused():
    edst = kft.EDSTCallback(member_dir="m", learning_rate_plan="step",
                            restart_height=0.7, exclude_dropped=True,
                            novelty=2.0, refinement_drop_fraction=0.3,
                            refinement_drop_decay="cosine",
                            global_grow_init="random")
    clone = kft.EDSTCallback.from_config(edst.get_config())
    assert clone.get_config() == edst.get_config()
    custom = kft.EDSTCallback(member_dir="m",
                              learning_rate_plan=lambda p, e, n: 1.0)
    with pytest.raises(ValueError, match="callable `learning_rate_plan`"):
        custom.get_config()


def test_monitor_and_mode_follow_keras_words(tmp_path):
    old = kft.EDSTCallback(member_dir="m", save_best="val_loss",
                           save_best_mode="min")
    new = kft.EDSTCallback(member_dir="m", monitor="val_loss", mode="min")
    assert old.get_config() == new.get_config()
    with pytest.raises(ValueError, match="mode='best'"):
        kft.EDSTCallback(member_dir="m", monitor="val_loss", mode="best")
    # mode="auto" keeps the highest accuracy of each phase.
    model = small_model()
    compile_sparse(model)
    model.compile(model.optimizer,
                  keras.losses.SparseCategoricalCrossentropy(True),
                  metrics=["accuracy"])
    edst = kft.EDSTCallback(num_members=1, exploration_epochs=1,
                            refinement_epochs=3, member_dir=tmp_path,
                            monitor="val_accuracy")
    x, y = toy_data()
    history = model.fit(x, y, batch_size=32, epochs=edst.total_epochs,
                        validation_data=(x[:96], y[:96]), shuffle=False,
                        callbacks=[edst], verbose=0)
    phase = history.history["val_accuracy"][1:]
    meta = members_lib.read_member_metadata(
        members_lib.member_path(tmp_path, 0))
    assert meta["monitor"] == pytest.approx(max(phase))
    assert meta["epoch"] == 2 + int(np.argmax(phase))


def test_official_preset_is_one_argument_away():
    official = kft.EDSTCallback(member_dir="m", preset="official")
    config = official.get_config()
    for name, value in edst_lib.OFFICIAL_LEVERS.items():
        assert config[name] == value, name
    assert kft.EDSTCallback(member_dir="m", preset="official",
                            learning_rate_plan="official").get_config() == (
        config)
    with pytest.raises(ValueError, match="novelty=3.0"):
        kft.EDSTCallback(member_dir="m", preset="official", novelty=3.0)
    with pytest.raises(ValueError, match="preset='paper'"):
        kft.EDSTCallback(member_dir="m", preset="paper")


def test_signature_defaults_are_the_documented_default_levers():
    import inspect

    from keras_freetickets import _edst_levers

    params = inspect.signature(kft.EDSTCallback.__init__).parameters
    for name, value in _edst_levers.DEFAULT_LEVERS.items():
        default = params[name].default
        if name == "learning_rate_plan":
            default = default or value
        assert default == value, name
    config = kft.EDSTCallback(member_dir="m").get_config()
    assert {k: config[k] for k in _edst_levers.DEFAULT_LEVERS} == (
        _edst_levers.DEFAULT_LEVERS)
