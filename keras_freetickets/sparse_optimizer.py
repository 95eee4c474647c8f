"""`SparseOptimizer`: dynamic sparse training (RigL / SET) as a Keras 3 optimizer."""

import keras
import numpy as np
import tensorflow as tf

from keras_freetickets import _inner
from keras_freetickets import _keras_compat as compat
from keras_freetickets import _rewiring
from keras_freetickets._controls import ExplorationControls
from keras_freetickets._queries import SparseStateQueries
from keras_freetickets import distributions
from keras_freetickets import prunable
from keras_freetickets import schedules
from keras_freetickets import updaters
from keras_freetickets._validation import check_bool
from keras_freetickets._validation import check_fraction
from keras_freetickets._validation import check_int

GROW_MODES = ("gradient", "random")
_NO_STEP = -1


@keras.saving.register_keras_serializable(package="keras_freetickets")
class SparseOptimizer(
    SparseStateQueries, ExplorationControls, keras.optimizers.Optimizer
):
    """Keeps a network sparse from its first step and rewires it while it trains.

    `SparseOptimizer` wraps a Keras 3 optimizer. When it is built, every
    prunable weight (see `keras_freetickets.prunable`) gets a fixed number of
    active entries: the per-layer sparsities follow `distribution` ("erk" by
    default) and each mask holds exactly `round((1 - s_l) * n_l)` ones, drawn
    with `seed`. On every step the gradients of inactive weights are zeroed
    before they reach the inner optimizer, so its slots never see them and the
    inactive weights stay exactly 0. Every `update_interval` steps inside the
    update window, each sparse layer drops its k smallest-magnitude active
    weights and grows k inactive ones, by the largest dense-gradient magnitude
    of that step (`grow="gradient"`, RigL) or at random (`grow="random"`,
    SET), with k = round(p_t * active_l). Grown weights start at 0 and their
    slots (momentum, Adam moments) are reset. Everything happens inside the
    compiled train step, per variable in the inner optimizer's distributed
    update, so under `tf.distribute` the masks are decided from the
    all-reduced gradients and are the same on every replica.

    Masks, the record of weights ever activated and the update counters are
    optimizer variables: `model.save()` / `keras.models.load_model()` and
    `keras.callbacks.BackupAndRestore` keep them.

    Args:
        inner_optimizer: A Keras 3 `keras.optimizers.Optimizer` with
            per-variable slots (SGD, Adam, AdamW, Adamax, Nadam, RMSprop,
            Lion, Adagrad, Adadelta, Lamb, or a custom one).
        sparsity: float in [0, 1). Fraction of prunable weights that are zero.
        distribution: "erk", "er", "uniform" or a callable
            `(shapes, sparsity, overrides) -> {path: sparsity}`.
        grow: how weights are grown: "gradient" (RigL), "random" (SET),
            another name registered with
            `keras_freetickets.updaters.register_updater`, or an
            `keras_freetickets.updaters.Updater` instance.
        drop_fraction: float in (0, 1]. Fraction p of each layer's active
            weights replaced at an update.
        drop_fraction_schedule: "constant", "cosine" (decay to 0 over the
            update window) or a callable `step -> p_t` traced into the step.
        update_interval: int >= 1. Steps between mask updates.
        update_start_step: int. First step with a mask update (default:
            `update_interval`).
        update_end_step: int or None. No local mask update at or after this
            step. Default: 75% of `total_steps` if that is given, else no end.
        total_steps: int or None. Length of training, used for the default
            `update_end_step`.
        overrides: dict mapping a layer name, a variable path or a path
            suffix to that weight's sparsity, for example `{"dense": 0.0}`
            to keep a first layer dense. Other layers compensate under
            "erk"/"er" so that the global sparsity stays at `sparsity`.
        include_embeddings: bool. Also prune `Embedding` tables.
        seed: int. Seeds the initial masks and random growth.
        schedule: a `keras_freetickets.schedules.UpdateSchedule`, in place
            of the six schedule arguments above (`drop_fraction` to
            `total_steps`), which otherwise build one.
        global_exploration: bool. Build the state for global explorations
            (EDST): one more bool per sparse weight recording what the last
            global exploration removed, and the EDST lever controls, so that
            EDSTCallback changes nothing in the traced step. EDSTCallback
            turns it on by itself when the optimizer is not built yet.
        fused_sgd: bool. With `keras.optimizers.SGD` inside, apply its update
            to the masked kernels as one TensorFlow op: the same weights bit
            for bit, faster outside XLA. False runs Keras's own update.
        name: str. Name of the optimizer.

    Example:

    ```python
    opt = kft.SparseOptimizer(keras.optimizers.SGD(0.05, momentum=0.9),
                              sparsity=0.8, update_interval=100)
    model.compile(optimizer=opt, loss="sparse_categorical_crossentropy")
    model.fit(x, y, epochs=3)
    masks = opt.get_masks()
    ```
    """

    def __init__(
        self,
        inner_optimizer,
        sparsity=0.8,
        distribution="erk",
        grow="gradient",
        drop_fraction=0.5,
        drop_fraction_schedule="constant",
        update_interval=100,
        update_start_step=None,
        update_end_step=None,
        total_steps=None,
        overrides=None,
        include_embeddings=False,
        seed=0,
        schedule=None,
        global_exploration=False,
        fused_sgd=True,
        name=None,
        **kwargs,
    ):
        _inner.check_inner_optimizer(inner_optimizer)
        if kwargs:
            raise ValueError(
                "SparseOptimizer does not take the base optimizer arguments "
                f"{sorted(kwargs)}: set them on the inner optimizer."
            )
        check_fraction("sparsity", sparsity, allow_zero=True)
        if not callable(distribution):
            distributions.get(distribution)  # raises on an unknown name
        updater = updaters.get(grow)
        if schedule is None:
            schedule = schedules.UpdateSchedule(
                update_interval=update_interval, drop_fraction=drop_fraction,
                decay=drop_fraction_schedule, start_step=update_start_step,
                end_step=update_end_step, total_steps=total_steps,
            )
        elif not isinstance(schedule, schedules.UpdateSchedule):
            raise ValueError(
                "Argument `schedule` must be a "
                "keras_freetickets.schedules.UpdateSchedule. Received: "
                f"schedule={schedule!r}"
            )
        overrides = dict(overrides or {})
        for key, value in overrides.items():
            if not isinstance(key, str):
                raise ValueError(
                    "Argument `overrides` must map layer names or variable "
                    f"paths to sparsities. Received key: {key!r}"
                )
            check_fraction(f"overrides[{key!r}]", value, allow_zero=True)
        check_int("seed", seed, minimum=0)
        global_exploration = check_bool("global_exploration", global_exploration)
        fused_sgd = check_bool("fused_sgd", fused_sgd)

        super().__init__(learning_rate=0.0, name=name)
        self.inner_optimizer = inner_optimizer
        self.updater = updater
        self.sparsity = float(sparsity)
        self.distribution = distribution
        self.grow = grow if isinstance(grow, str) else updaters.name_of(
            self.updater
        )
        self.schedule = schedule
        self.overrides = overrides
        self.include_embeddings = bool(include_embeddings)
        self.seed = int(seed)
        self.global_exploration = global_exploration
        self.fused_sgd = fused_sgd
        # Values the control variables start from when the optimizer is
        # built (callbacks may set them before Keras builds it while tracing
        # the first train step).
        self._initial_controls = dict(
            update_stop_step=self.schedule.stop_step,
            global_explore_step=_NO_STEP, global_drop_fraction=0.0,
            global_grow_mode=0, novelty=0.0, local_drop_scale=1.0,
            exclude_dropped=False, global_grow_init=0.0,
        )
        self._sparse_layers = []
        self._dense_prunable = []
        self._layer_of_key = {}
        self._step_updates = None  # set during apply

    # The schedule's settings, under the argument names they came from.
    update_interval = property(lambda self: self.schedule.update_interval)
    update_start_step = property(lambda self: self.schedule.start_step)
    update_end_step = property(lambda self: self.schedule.end_step)
    total_steps = property(lambda self: self.schedule.total_steps)
    drop_fraction = property(lambda self: self.schedule.drop_fraction)
    drop_fraction_schedule = property(lambda self: self.schedule.decay)

    # ------------------------------------------------------------------ build
    @compat.no_automatic_dependency_tracking
    def build(self, var_list):
        if self.built:
            return
        var_list = list(var_list)
        self.inner_optimizer.build(var_list)
        candidates = prunable.prunable_variables(
            var_list, self.include_embeddings
        )
        if not candidates:
            raise ValueError(
                "SparseOptimizer found no prunable weights in the model (the "
                "kernels of Dense, EinsumDense, Conv and SeparableConv "
                "layers; see keras_freetickets.prunable for custom layers). "
                f"Received variables: {[v.path for v in var_list]}"
            )
        shapes = {v.path: tuple(v.shape) for v in candidates}
        overrides = self._resolve_overrides(shapes)
        if callable(self.distribution):
            sparsities = self.distribution(shapes, self.sparsity, overrides)
        else:
            sparsities = distributions.compute_sparsities(
                shapes, self.sparsity, self.distribution, overrides=overrides
            )
        counts = distributions.resolve_counts(shapes, sparsities)

        strategy = compat.strategy_of(self)
        slot_owner = _inner.slot_owners(var_list, self.inner_optimizer.variables)
        reset_values = _inner.slot_reset_values(self.inner_optimizer)
        for variable in candidates:
            size = int(np.prod(variable.shape))
            if counts[variable.path] >= size:
                self._dense_prunable.append(variable)
                continue
            layer = _rewiring.SparseLayer(
                len(self._sparse_layers), variable,
                float(sparsities[variable.path]), counts[variable.path],
            )
            layer.k_max, layer.k_exact = self.schedule.k_bound(
                layer.num_active
            )
            initial = self._initial_mask(layer)
            base = variable.path.replace("/", "_")
            with strategy.extended.colocate_vars_with(variable.value):
                layer.mask = self.add_variable(
                    shape=layer.shape, dtype="bool", name=f"{base}_mask",
                    initializer=_constant_initializer(initial),
                )
                layer.ever_active = self.add_variable(
                    shape=layer.shape, dtype="bool",
                    name=f"{base}_ever_active",
                    initializer=_constant_initializer(initial),
                )
                layer.changed = self.add_variable(
                    shape=(), dtype="float32", name=f"{base}_mask_changed",
                )
                if self.global_exploration:
                    layer.dropped = self.add_variable(
                        shape=layer.shape, dtype="bool",
                        name=f"{base}_globally_dropped",
                    )
            for slot in slot_owner.get(id(variable), []):
                layer.slots.append((slot, reset_values(slot)))
            # Build may run while the first train step is traced: mask the
            # kernel eagerly, once, not as an op of that trace.
            with tf.init_scope():
                variable.assign(
                    tf.where(initial, variable.value,
                             tf.zeros_like(variable.value))
                )
            self._layer_of_key[
                compat.variable_key(self.inner_optimizer, variable)
            ] = layer
            self._sparse_layers.append(layer)

        self.mask_updates = self.add_variable(
            shape=(), dtype="int64", name="mask_updates"
        )
        controls = [("update_stop_step", "int64"),
                    ("global_explore_step", "int64"),
                    ("global_drop_fraction", "float32")]
        if self.global_exploration:
            controls += [("global_grow_mode", "int32"),
                         ("novelty", "float32"),
                         ("local_drop_scale", "float32"),
                         ("exclude_dropped", "bool"),
                         ("global_grow_init", "float32")]
        for control, dtype in controls:
            value = self._initial_controls[control]
            setattr(self, control, self.add_variable(
                shape=(), dtype=dtype, name=control,
                initializer=_constant_initializer(np.array(value, dtype)),
            ))
        # Route the inner optimizer's per-variable update through the masks
        # (why it must be on the inner instance: see hook_update_step).
        self._inner_update_step = compat.hook_update_step(
            self.inner_optimizer, self._masked_update_step
        )
        self._remask = (
            type(self.inner_optimizer).__name__ not in _inner.ZERO_PRESERVING
            or any(v.constraint is not None for v in candidates)
        )
        super().build(var_list)

    def _resolve_overrides(self, shapes):
        resolved = {}
        for key, value in self.overrides.items():
            hits = [p for p in shapes if prunable.matches(key, p)]
            if not hits:
                raise ValueError(
                    f"Argument `overrides` names no prunable weight: {key!r}. "
                    f"Prunable weights: {list(shapes)}"
                )
            for path in hits:
                resolved[path] = float(value)
        return resolved

    def _initial_mask(self, layer):
        rng = np.random.default_rng([self.seed, layer.index])
        flat = np.zeros(layer.size, dtype=bool)
        flat[rng.permutation(layer.size)[: layer.num_active]] = True
        return flat.reshape(layer.shape)

    # ------------------------------------------------------------ train step
    def apply(self, grads, trainable_variables=None):
        if not self.built:
            _inner.build_eagerly(self, trainable_variables)
            self.built = True
        # A local name too: under MirroredStrategy every replica's thread
        # runs this method on the same object.
        step_updates = _rewiring.StepUpdates(self, grads, trainable_variables)
        self._step_updates = step_updates
        try:
            self.inner_optimizer.apply(grads, trainable_variables)
            step_updates.flush()  # only if some kernel was never seen
        finally:
            self._step_updates = None

    def _masked_update_step(self, gradient, variable, learning_rate):
        layer = self._layer_of_key.get(
            compat.variable_key(self.inner_optimizer, variable)
        )
        if layer is None:
            return self._inner_update_step(gradient, variable, learning_rate)
        mask = tf.convert_to_tensor(layer.mask.value)

        def inner_update():
            if isinstance(gradient, tf.IndexedSlices):
                rows = tf.gather(mask, gradient.indices)
                self._inner_update_step(tf.IndexedSlices(
                    tf.where(rows, gradient.values, tf.zeros_like(gradient.values)),
                    gradient.indices, gradient.dense_shape,
                ), variable, learning_rate)
            elif not (self.fused_sgd and _inner.fused_sgd_update(
                    self.inner_optimizer, gradient, variable, learning_rate,
                    mask=mask)):
                self._inner_update_step(_inner.masked_gradient(gradient, mask),
                                        variable, learning_rate)
            if self._remask:
                variable.assign(tf.where(mask, variable, tf.zeros_like(variable)))

        step_updates = self._step_updates or _rewiring.StepUpdates(self)
        if step_updates.defers_inner_updates():
            # Under XLA the kernel's own update moves into both branches of
            # the step's mask-update `cond` (see `StepUpdates`).
            step_updates.add(layer, variable, mask, gradient, inner_update)
        else:
            inner_update()
            step_updates.add(layer, variable, mask, gradient)

    # ------------------------------------------------------------ delegation
    @property
    def variables(self):
        return compat.optimizer_own_variables(self) + self.inner_optimizer.variables

    @property
    def learning_rate(self):
        return self.inner_optimizer.learning_rate

    @learning_rate.setter
    def learning_rate(self, learning_rate):
        self.inner_optimizer.learning_rate = learning_rate

    @property
    def iterations(self):
        return self.inner_optimizer.iterations

    def scale_loss(self, loss):
        return self.inner_optimizer.scale_loss(loss)

    def finalize_variable_values(self, var_list):
        self.inner_optimizer.finalize_variable_values(var_list)

    def stateless_apply(self, optimizer_variables, grads, trainable_variables):
        raise NotImplementedError(
            "SparseOptimizer runs on the TensorFlow backend only."
        )

    # --------------------------------------------------------- serialization
    def get_config(self):
        serialize = keras.saving.serialize_keras_object
        schedule = self.schedule.get_config()
        return {
            "name": self.name,
            "inner_optimizer": serialize(self.inner_optimizer),
            "sparsity": self.sparsity,
            "distribution": (
                serialize(self.distribution) if callable(self.distribution)
                else self.distribution
            ),
            "grow": self.grow if self.grow else serialize(self.updater),
            "drop_fraction": schedule["drop_fraction"],
            "drop_fraction_schedule": schedule["decay"],
            "update_interval": schedule["update_interval"],
            "update_start_step": schedule["start_step"],
            "update_end_step": schedule["end_step"],
            "total_steps": schedule["total_steps"],
            "overrides": dict(self.overrides),
            "include_embeddings": self.include_embeddings,
            "seed": self.seed,
            "global_exploration": self.global_exploration,
            "fused_sgd": self.fused_sgd,
        }

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        deserialize = keras.saving.deserialize_keras_object
        config["inner_optimizer"] = deserialize(
            config["inner_optimizer"], custom_objects=custom_objects
        )
        for key in ("distribution", "drop_fraction_schedule", "grow"):
            if isinstance(config.get(key), dict):
                config[key] = deserialize(
                    config[key], custom_objects=custom_objects
                )
        return cls(**config)


def _constant_initializer(array):
    def initializer(shape, dtype=None):
        del shape, dtype
        return tf.constant(array)

    return initializer
