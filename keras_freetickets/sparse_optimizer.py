"""`SparseOptimizer`: dynamic sparse training (RigL / SET) as a Keras 3 optimizer."""

import math

import keras
import numpy as np
import tensorflow as tf
from keras.src.utils import tracking

from keras_freetickets import distributions
from keras_freetickets import prunable
from keras_freetickets import schedules
from keras_freetickets._validation import check_fraction
from keras_freetickets._validation import check_int

GROW_MODES = ("gradient", "random")

# Optimizers whose update keeps a weight at exactly zero when its gradient and
# all its slots are zero (every term of their update is a product with, or a
# ratio over, the masked gradient or a slot). For these no re-mask is needed
# after the inner update. Any other optimizer gets an explicit re-mask.
_ZERO_PRESERVING = {
    "SGD", "Adam", "AdamW", "Adamax", "Nadam", "RMSprop", "Lion", "Adagrad",
    "Adadelta", "Lamb",
}
# Optimizers whose per-variable state cannot be masked entry by entry.
_REFUSED = {
    "Adafactor": "its second-moment slots are factored into row and column "
    "statistics, which cannot be reset for single weights",
    "Muon": "its orthogonalized update mixes all entries of a kernel, so "
    "inactive weights would not stay at zero",
    "Ftrl": "its weights are recomputed from accumulators, so inactive "
    "weights would not stay at zero",
    "ScheduleFreeAdamW": "it interpolates between weight sequences that the "
    "masks cannot keep in step",
    "LossScaleOptimizer": "wrap the SparseOptimizer in the LossScaleOptimizer "
    "instead (Keras does this itself under a mixed_float16 policy)",
    "MultiOptimizer": "wrap each of its optimizers instead",
}
_NEG_INF = float("-inf")
_NO_STEP = -1
_NO_END = 2**62


class _SparseLayer:
    """Static facts and state variables of one masked weight."""

    def __init__(self, index, variable, sparsity, num_active):
        self.index = index
        self.variable = variable
        self.path = variable.path
        self.shape = tuple(variable.shape)
        self.size = int(np.prod(self.shape))
        self.sparsity = sparsity
        self.num_active = num_active
        self.mask = None
        self.ever_active = None
        self.changed = None
        self.slots = []  # (slot variable, value it is reset to)


@keras.saving.register_keras_serializable(package="keras_freetickets")
class SparseOptimizer(keras.optimizers.Optimizer):
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
        grow: "gradient" (RigL) or "random" (SET).
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
        name=None,
        **kwargs,
    ):
        _check_inner_optimizer(inner_optimizer)
        if kwargs:
            raise ValueError(
                "SparseOptimizer does not take the base optimizer arguments "
                f"{sorted(kwargs)}: set them on the inner optimizer."
            )
        check_fraction("sparsity", sparsity, allow_zero=True)
        if not callable(distribution):
            distributions.get(distribution)  # raises on an unknown name
        if grow not in GROW_MODES:
            raise ValueError(
                f"Argument `grow` must be one of {list(GROW_MODES)}. "
                f"Received: grow={grow!r}"
            )
        check_fraction("drop_fraction", drop_fraction)
        check_int("update_interval", update_interval, minimum=1)
        if update_start_step is None:
            update_start_step = update_interval
        check_int("update_start_step", update_start_step, minimum=0)
        if total_steps is not None:
            check_int("total_steps", total_steps, minimum=1)
        if update_end_step is None and total_steps is not None:
            update_end_step = int(math.floor(0.75 * total_steps + 0.5))
        if update_end_step is not None:
            check_int("update_end_step", update_end_step, minimum=0)
            if update_end_step <= update_start_step:
                raise ValueError(
                    "Argument `update_end_step` must be greater than "
                    f"`update_start_step` ({update_start_step}). Received: "
                    f"update_end_step={update_end_step}"
                )
        # Raises for unknown names and for "cosine" without an end.
        drop_schedule = schedules.get(
            drop_fraction_schedule, float(drop_fraction),
            update_start_step, update_end_step,
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

        super().__init__(learning_rate=0.0, name=name)
        self._drop_schedule = drop_schedule
        self.inner_optimizer = inner_optimizer
        self.sparsity = float(sparsity)
        self.distribution = distribution
        self.grow = grow
        self.drop_fraction = float(drop_fraction)
        self.drop_fraction_schedule = drop_fraction_schedule
        self.update_interval = int(update_interval)
        self.update_start_step = int(update_start_step)
        self.update_end_step = update_end_step
        self.total_steps = total_steps
        self.overrides = overrides
        self.include_embeddings = bool(include_embeddings)
        self.seed = int(seed)
        # Set by EDSTCallback before the train step is traced: global
        # explorations may drop up to all active weights of a layer.
        self._global_exploration = False
        self._global_grow = None
        self._pending_controls = [
            self._configured_stop_step(), _NO_STEP, 0.0
        ]
        self._sparse_layers = []
        self._dense_prunable = []
        self._layer_of_key = {}

    # ------------------------------------------------------------------ build
    @tracking.no_automatic_dependency_tracking
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

        strategy = self._distribution_strategy
        slot_owner = _slot_owners(var_list, self.inner_optimizer.variables)
        reset_values = _slot_reset_values(self.inner_optimizer)
        for variable in candidates:
            size = int(np.prod(variable.shape))
            if counts[variable.path] >= size:
                self._dense_prunable.append(variable)
                continue
            layer = _SparseLayer(
                len(self._sparse_layers), variable,
                float(sparsities[variable.path]), counts[variable.path],
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
            for slot in slot_owner.get(id(variable), []):
                layer.slots.append((slot, reset_values(slot)))
            # Build may run while the first train step is traced: mask the
            # kernel eagerly, once, not as an op of that trace.
            with tf.init_scope():
                variable.assign(
                    tf.where(initial, variable.value,
                             tf.zeros_like(variable.value))
                )
            self._layer_of_key[self.inner_optimizer._var_key(variable)] = (
                layer
            )
            self._sparse_layers.append(layer)

        self.mask_updates = self.add_variable(
            shape=(), dtype="int64", name="mask_updates"
        )
        # Callbacks may set these before the optimizer is built (Keras
        # builds it while tracing the first train step).
        stop_step, explore_step, explore_fraction = self._pending_controls
        self.update_stop_step = self.add_variable(
            shape=(), dtype="int64", name="update_stop_step",
            initializer=keras.initializers.Constant(stop_step),
        )
        self.global_explore_step = self.add_variable(
            shape=(), dtype="int64", name="global_explore_step",
            initializer=keras.initializers.Constant(explore_step),
        )
        self.global_drop_fraction = self.add_variable(
            shape=(), dtype="float32", name="global_drop_fraction",
            initializer=keras.initializers.Constant(explore_fraction),
        )
        # Route the inner optimizer's per-variable update through the masks.
        self._inner_update_step = type(self.inner_optimizer).update_step.__get__(
            self.inner_optimizer
        )
        object.__setattr__(
            self.inner_optimizer, "update_step", self._masked_update_step
        )
        self._remask = (
            type(self.inner_optimizer).__name__ not in _ZERO_PRESERVING
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
            with keras.name_scope(self.name, caller=self):
                self.build(trainable_variables)
            self.built = True
        self.inner_optimizer.apply(grads, trainable_variables)

    def _masked_update_step(self, gradient, variable, learning_rate):
        layer = self._layer_of_key.get(self.inner_optimizer._var_key(variable))
        if layer is None:
            return self._inner_update_step(gradient, variable, learning_rate)
        mask = tf.convert_to_tensor(layer.mask.value)
        raw_gradient = gradient
        if isinstance(gradient, tf.IndexedSlices):
            rows = tf.gather(mask, gradient.indices)
            gradient = tf.IndexedSlices(
                tf.where(rows, gradient.values, tf.zeros_like(gradient.values)),
                gradient.indices, gradient.dense_shape,
            )
        else:
            # A scalar zero broadcasts: no full-size zeros tensor per step.
            gradient = tf.where(mask, gradient, tf.zeros([], gradient.dtype))
        self._inner_update_step(gradient, variable, learning_rate)
        if self._remask:
            variable.assign(tf.where(mask, variable, tf.zeros_like(variable)))

        step = tf.convert_to_tensor(self.inner_optimizer.iterations)
        step = tf.cast(step, tf.int64)
        is_global = tf.equal(step, self.global_explore_step.value)
        is_local = tf.logical_and(
            tf.logical_and(
                step >= self.update_start_step,
                step < self.update_stop_step.value,
            ),
            tf.equal(
                tf.math.floormod(
                    step - self.update_start_step, self.update_interval
                ),
                0,
            ),
        )
        tf.cond(
            tf.logical_or(is_global, is_local),
            lambda: self._prune_and_grow(
                layer, variable, mask, raw_gradient, step, is_global
            ),
            lambda: tf.constant(False),
        )

    def _k_max(self, layer):
        """Static upper bound on k, so that `top_k` has a static size, and
        whether k always equals it (then the picks need no sorting)."""
        if self._global_exploration or callable(self.drop_fraction_schedule):
            return layer.num_active, False
        if self.drop_fraction_schedule == "constant":
            # The graph's own float32 arithmetic, so that k == k_max.
            k = int(np.floor(
                np.float32(self.drop_fraction) * np.float32(layer.num_active)
                + np.float32(0.5)
            ))
            return min(layer.num_active, k), True
        return min(
            layer.num_active,
            int(math.ceil(self.drop_fraction * layer.num_active)),
        ), False

    def _prune_and_grow(self, layer, variable, mask, gradient, step, is_global):
        n = layer.size
        k_max, k_is_static = self._k_max(layer)
        # With every pick kept, the order of the picks does not matter, and
        # an unsorted top_k is cheaper.
        picks_sorted = not k_is_static
        fraction = tf.where(
            is_global,
            self.global_drop_fraction.value,
            self._drop_schedule(step),
        )
        k = tf.cast(tf.floor(fraction * layer.num_active + 0.5), tf.int32)
        k = tf.minimum(k, k_max)
        select = tf.range(k_max) < k

        weights = tf.reshape(tf.convert_to_tensor(variable), [-1])
        old = tf.reshape(mask, [-1])
        # Drop: the k active weights of smallest magnitude. Inactive entries
        # score -inf, and k_max <= num_active, so every pick is active.
        # top_k needs NaN-free scores to pick k distinct entries (a NaN
        # weight or gradient broke the exact counts): a non-finite weight is
        # dropped first, a non-finite gradient scores 0 for growth.
        finite = tf.math.is_finite(weights)
        drop_score = tf.where(old, tf.where(finite, -tf.abs(weights), -_NEG_INF), _NEG_INF)
        _, drop_idx = tf.math.top_k(drop_score, k_max, sorted=picks_sorted)
        dropped = _scatter_flags(drop_idx, select, n)
        kept = tf.logical_and(old, tf.logical_not(dropped))
        # Grow: the k best of all weights inactive after the drop (RigL's
        # candidates, which include the weights just dropped).
        def gradient_score():
            flat = tf.cast(tf.reshape(tf.convert_to_tensor(gradient), [-1]), tf.float32)
            return tf.where(tf.math.is_finite(flat), tf.abs(flat), 0.0)

        def random_score():
            key = tf.stack(
                [tf.constant(self.seed, tf.int64) * 65537 + layer.index, step]
            )
            return tf.random.stateless_uniform([n], seed=key, alg="philox")

        scores = {"gradient": gradient_score, "random": random_score}
        global_grow = self._global_grow or self.grow
        if not self._global_exploration or global_grow == self.grow:
            score = scores[self.grow]()
        else:
            score = tf.cond(is_global, scores[global_grow], scores[self.grow])
        grow_score = tf.where(kept, _NEG_INF, score)
        _, grow_idx = tf.math.top_k(grow_score, k_max, sorted=picks_sorted)
        grown = _scatter_flags(grow_idx, select, n)
        new = tf.logical_or(kept, grown)

        shape = layer.shape
        variable.assign(
            tf.reshape(tf.where(kept, weights, tf.zeros_like(weights)), shape)
        )
        kept_shaped = tf.reshape(kept, shape)
        for slot, reset in layer.slots:
            slot_value = tf.convert_to_tensor(slot.value)
            slot.value.assign(
                tf.where(kept_shaped, slot_value,
                         tf.fill(shape, tf.cast(reset, slot_value.dtype)))
            )
        new_shaped = tf.reshape(new, shape)
        layer.mask.value.assign(new_shaped)
        layer.ever_active.value.assign(
            tf.logical_or(tf.convert_to_tensor(layer.ever_active.value),
                          new_shaped)
        )
        activated = tf.reduce_sum(
            tf.cast(tf.logical_and(new, tf.logical_not(old)), tf.float32)
        )
        layer.changed.value.assign(activated / float(layer.num_active))
        if layer.index == 0:
            self.mask_updates.value.assign_add(1)
        return tf.constant(True)

    # ------------------------------------------------------ global exploration
    def enable_global_exploration(self, grow=None):
        """Lets `schedule_global_exploration` drop any fraction of weights.

        Must be called before the train step is traced (EDSTCallback does it
        in `set_model`). Returns True when this changed the traced program.

        Args:
            grow: "gradient", "random" or None (the optimizer's `grow`): how
                global explorations regrow weights.
        """
        if grow is not None and grow not in GROW_MODES:
            raise ValueError(
                f"Argument `grow` must be one of {list(GROW_MODES)}. "
                f"Received: grow={grow!r}"
            )
        changed = not self._global_exploration or grow != self._global_grow
        self._global_exploration = True
        self._global_grow = grow
        return changed

    def schedule_global_exploration(self, step, drop_fraction):
        """Makes the train step numbered `step` a global exploration.

        At that step every sparse layer drops `drop_fraction` of its active
        weights by magnitude and grows as many (by `grow`), whatever the
        local update schedule says.
        """
        check_fraction("drop_fraction", drop_fraction)
        if drop_fraction > self.drop_fraction and not self._global_exploration:
            raise ValueError(
                "Call enable_global_exploration() before the train step is "
                "traced to drop more than `drop_fraction` "
                f"({self.drop_fraction}). Received: drop_fraction="
                f"{drop_fraction}"
            )
        if not self.built:
            self._pending_controls[1:] = [int(step), float(drop_fraction)]
            return
        self.global_explore_step.assign(int(step))
        self.global_drop_fraction.assign(float(drop_fraction))

    def set_update_stop_step(self, step):
        """Pauses local mask updates from train step `step` on.

        `None` restores the configured `update_end_step`.
        """
        if step is None:
            step = self._configured_stop_step()
        else:
            step = min(int(step), self._configured_stop_step())
        if not self.built:
            self._pending_controls[0] = int(step)
            return
        self.update_stop_step.assign(int(step))

    def _configured_stop_step(self):
        return _NO_END if self.update_end_step is None else (
            self.update_end_step
        )

    # --------------------------------------------------------------- queries
    def _require_built(self):
        if not self.built:
            raise ValueError(
                "The SparseOptimizer is not built yet: call "
                "`optimizer.build(model.trainable_variables)` or train first."
            )

    @property
    def sparse_layers(self):
        return list(self._sparse_layers)

    def get_masks(self):
        """Returns {variable path: 0/1 float32 array} for every prunable weight.

        Weights that the distribution left dense get an all-ones mask.
        """
        self._require_built()
        masks = {}
        for variable in self._dense_prunable:
            masks[variable.path] = np.ones(variable.shape, np.float32)
        for layer in self._sparse_layers:
            masks[layer.path] = layer.mask.numpy().astype(np.float32)
        return masks

    def layer_stats(self):
        """Per prunable weight: shape, density, active, total, mask changed at
        the last update, and fraction of weights ever activated."""
        self._require_built()
        stats = []
        for variable in self._dense_prunable:
            size = int(np.prod(variable.shape))
            stats.append(dict(
                path=variable.path, shape=tuple(variable.shape), density=1.0,
                active=size, total=size, target_active=size,
                mask_changed=0.0, ever_active=1.0,
            ))
        for layer in self._sparse_layers:
            active = int(np.count_nonzero(layer.mask.numpy()))
            stats.append(dict(
                path=layer.path, shape=layer.shape,
                density=active / layer.size, active=active, total=layer.size,
                target_active=layer.num_active,
                mask_changed=float(layer.changed.numpy()),
                ever_active=float(
                    np.count_nonzero(layer.ever_active.numpy()) / layer.size
                ),
            ))
        order = {v.path: i for i, v in enumerate(self._trainable_variables)}
        return sorted(stats, key=lambda s: order.get(s["path"], 0))

    def check_invariants(self):
        """Returns a list of violated mask invariants (empty when all hold).

        Each sparse layer must hold exactly its target number of active
        weights, and every weight outside its mask must be exactly 0.
        """
        self._require_built()
        problems = []
        for layer in self._sparse_layers:
            mask = layer.mask.numpy()
            active = int(np.count_nonzero(mask))
            if active != layer.num_active:
                problems.append(
                    f"{layer.path}: {active} active weights, expected "
                    f"{layer.num_active}"
                )
            outside = int(np.count_nonzero(layer.variable.numpy()[~mask]))
            if outside:
                problems.append(
                    f"{layer.path}: {outside} nonzero weights outside the mask"
                )
        return problems

    def state_bytes(self):
        """Bytes of the wrapper's own state (masks, records, counters)."""
        self._require_built()
        return int(sum(
            np.prod(v.shape) * np.dtype(v.dtype).itemsize
            for v in self._variables
        ))

    # ------------------------------------------------------------ delegation
    @property
    def variables(self):
        return self._variables + self.inner_optimizer.variables

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
        return {
            "name": self.name,
            "inner_optimizer": serialize(self.inner_optimizer),
            "sparsity": self.sparsity,
            "distribution": (
                serialize(self.distribution) if callable(self.distribution)
                else self.distribution
            ),
            "grow": self.grow,
            "drop_fraction": self.drop_fraction,
            "drop_fraction_schedule": (
                serialize(self.drop_fraction_schedule)
                if callable(self.drop_fraction_schedule)
                else self.drop_fraction_schedule
            ),
            "update_interval": self.update_interval,
            "update_start_step": self.update_start_step,
            "update_end_step": self.update_end_step,
            "total_steps": self.total_steps,
            "overrides": dict(self.overrides),
            "include_embeddings": self.include_embeddings,
            "seed": self.seed,
        }

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        deserialize = keras.saving.deserialize_keras_object
        config["inner_optimizer"] = deserialize(
            config["inner_optimizer"], custom_objects=custom_objects
        )
        for key in ("distribution", "drop_fraction_schedule"):
            if isinstance(config.get(key), dict):
                config[key] = deserialize(
                    config[key], custom_objects=custom_objects
                )
        return cls(**config)


def _check_inner_optimizer(inner):
    if not isinstance(inner, keras.optimizers.Optimizer):
        raise ValueError(
            "Argument `inner_optimizer` must be a Keras 3 optimizer "
            "(an instance of `keras.optimizers.Optimizer`). Received: "
            f"inner_optimizer={inner!r} of type {type(inner).__name__}"
        )
    for cls in type(inner).__mro__:
        if cls.__name__ in _REFUSED:
            raise ValueError(
                f"SparseOptimizer cannot wrap {type(inner).__name__}: "
                f"{_REFUSED[cls.__name__]}. Received: inner_optimizer={inner!r}"
            )
    if isinstance(inner, SparseOptimizer):
        raise ValueError(
            "Argument `inner_optimizer` is already a SparseOptimizer. "
            f"Received: inner_optimizer={inner!r}"
        )
    if inner.use_ema:
        raise ValueError(
            "SparseOptimizer cannot wrap an optimizer with `use_ema=True`: "
            "the moving averages of pruned weights would not stay at zero. "
            "Received: use_ema=True"
        )
    if inner.gradient_accumulation_steps:
        raise ValueError(
            "SparseOptimizer cannot wrap an optimizer with "
            "`gradient_accumulation_steps`: mask updates must see the "
            "gradient of one step. Received: gradient_accumulation_steps="
            f"{inner.gradient_accumulation_steps}"
        )
    if inner.built:
        raise ValueError(
            "Argument `inner_optimizer` is already built; pass a fresh "
            f"optimizer. Received: inner_optimizer={inner!r}"
        )


def _constant_initializer(array):
    def initializer(shape, dtype=None):
        del shape, dtype
        return tf.constant(array)

    return initializer


def _scatter_flags(indices, flags, size):
    counts = tf.scatter_nd(
        tf.expand_dims(indices, 1), tf.cast(flags, tf.int32), [size]
    )
    return counts > 0


def _slot_owners(var_list, optimizer_variables):
    """Maps id(model variable) -> its inner-optimizer slots, by slot name.

    Keras names a slot `<variable path with '_'>_<slot name>`; where two
    prefixes match, the longest wins.
    """
    prefixes = sorted(
        ((v.path.replace("/", "_") + "_", v) for v in var_list),
        key=lambda item: -len(item[0]),
    )
    owners = {}
    for slot in optimizer_variables:
        for prefix, variable in prefixes:
            if slot.name.startswith(prefix) and tuple(slot.shape) == tuple(
                variable.shape
            ):
                owners.setdefault(id(variable), []).append(slot)
                break
    return owners


def _slot_reset_values(inner):
    """Value a slot is reset to for a regrown weight (Adagrad's is not 0)."""
    name = type(inner).__name__

    def reset_value(slot):
        if name == "Adagrad" and slot.name.endswith("_accumulator"):
            return float(inner.initial_accumulator_value)
        return 0.0

    return reset_value
