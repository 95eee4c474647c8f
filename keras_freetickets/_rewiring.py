"""One mask update of one layer inside the train step (SparseOptimizer's).

`SparseLayer` holds a masked weight's facts and state variables,
`step_predicates` whether a step updates masks, `StepUpdates` the layers'
updates of one step under one `cond`, `update_program` the traced-once
update, `update_layer` decides k and the
grow scores (local or global update, EDST levers), `rewire` applies the
drop-and-grow of `keras_freetickets.masking` to the kernel, its mask, its
records and its optimizer slots.
"""

import functools

import numpy as np
import tensorflow as tf

from keras_freetickets import _keras_compat as compat
from keras_freetickets import masking
from keras_freetickets import updaters


class SparseLayer:
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
        self.dropped = None  # weights the last global exploration removed
        self.k_max = None
        self.k_exact = None
        self.slots = []  # (slot variable, value it is reset to)
        self.update_function = None  # see update_program


def step_predicates(opt):
    """(step, is it the global exploration, does it update masks) for the
    train step being traced: the same for every layer of `opt`."""
    step = tf.cast(
        tf.convert_to_tensor(opt.inner_optimizer.iterations), tf.int64
    )
    is_global = tf.equal(step, opt.global_explore_step.value)
    is_local = opt.schedule.is_update_step(step, opt.update_stop_step.value)
    return step, is_global, tf.logical_or(is_global, is_local)


# Whether, under XLA, the sparse kernels' own updates run inside the mask
# update's `cond` (see `StepUpdates`); False restores the layout where they
# run before it (the tests compare the two).
DEFER_INNER_UPDATES_UNDER_XLA = True


class StepUpdates:
    """The mask updates of one train step.

    Without a distribution strategy the inner optimizer updates every kernel
    first, and the last sparse kernel's update step runs all the layers'
    mask updates under one `tf.cond`: an ordinary step carries one untaken
    branch instead of one per sparse kernel. That is still inside the inner
    optimizer's update loop, before Keras applies constraints and counts
    the step, where the per-kernel updates ran; each update touches its own
    layer's state only, so the result is bit for bit the same. Under a
    strategy each kernel's update runs per device, with that device's
    copies (see `update_program`), and keeps its own `cond`.

    Under XLA (and no strategy) the sparse kernels' own updates (the inner
    optimizer's, on the masked gradients) are queued too and run first in
    both branches of that `cond`. XLA gives a conditional its own output
    buffers, so a branch that passes a variable through copies it: with the
    kernels and their slots written in both branches, the untaken branch
    computes them in place of copying them, and copies only the masks and
    records (benchmarks/SPEED.md, "Ordinary steps under XLA").
    """

    def __init__(self, opt, grads=(), variables=None):
        self.opt = opt
        # Whether this step updates masks is the same for every layer:
        # computed once, before the inner optimizer counts the step.
        self.step, self.is_global, self.update_now = step_predicates(opt)
        self.pending = []
        self.expected = 0  # kernels to wait for; 0: each runs its own cond
        if grads and not tf.distribute.has_strategy():
            if variables is None:
                variables = compat.optimizer_trainable_variables(opt)
            inner = opt.inner_optimizer
            self.expected = sum(
                1 for gradient, variable in zip(grads, variables)
                if gradient is not None
                and compat.variable_key(inner, variable) in opt._layer_of_key
            )

    def defers_inner_updates(self):
        """Whether kernels' own updates are queued (`add`'s `inner_update`)
        instead of run at once: under XLA, when this step's updates share
        one `cond`."""
        return bool(self.expected and DEFER_INNER_UPDATES_UNDER_XLA
                    and compat.in_xla_context())

    def add(self, layer, variable, mask, gradient, inner_update=None):
        """Queues one layer's update (after its kernel's inner update, or
        with `inner_update`, run first inside both branches)."""
        self.pending.append((layer, variable, mask, gradient, inner_update))
        if len(self.pending) >= self.expected:
            self.flush()

    def flush(self):
        """Runs the queued updates in one `cond` on this step's predicate."""
        pending, self.pending = self.pending, []
        if not pending:
            return

        def inner_updates():
            for *_, inner_update in pending:
                if inner_update is not None:
                    inner_update()

        def update_all():
            inner_updates()
            for layer, variable, mask, gradient, _ in pending:
                update_program(self.opt, layer, variable)(
                    mask, gradient, self.step, self.is_global
                )
            return tf.constant(True)

        def ordinary():
            inner_updates()
            return tf.constant(False)

        tf.cond(self.update_now, update_all, ordinary)


def update_program(opt, layer, variable):
    """The mask update of one layer as a callable
    `(mask, gradient, step, is_global) -> True`.

    The update, a few hundred ops a layer, is traced once into a nested
    `tf.function` that every trace of the train step calls. A step is
    traced twice when its first trace creates variables: a plain Keras
    optimizer built inside it, or a `LossScaleOptimizer` around this one
    (`SparseOptimizer` alone builds unlifted and is traced once, see
    `_inner.build_eagerly`); when the step was always traced twice, this
    took 0.2 s off FMNIST-MLP v1's first step. Under a strategy each
    device's update must capture that device's copies, so the update is
    traced inline.
    """
    update = functools.partial(update_layer, opt, layer, variable)
    if tf.distribute.has_strategy():
        return update
    if layer.update_function is None:
        layer.update_function = tf.function(update, autograph=False)
    return layer.update_function


def update_layer(opt, layer, variable, mask, gradient, step, is_global):
    """The mask update of one layer, local or global, inside the step."""
    context = updaters.UpdateContext(
        seed=opt.seed, layer_index=layer.index, step=step, size=layer.size
    )
    # The static size keeps every shape known (an embedding's IndexedSlices
    # gradient converts to a tensor of unknown shape).
    weights = tf.reshape(tf.convert_to_tensor(variable), [layer.size])
    flat_gradient = tf.reshape(tf.convert_to_tensor(gradient), [layer.size])

    def local_score():
        return opt.updater.grow_score(weights, flat_gradient, context)

    local_fraction = opt.schedule.drop_fraction_at(step)
    if not opt.global_exploration:
        k = tf.minimum(
            masking.count_for(local_fraction, layer.num_active),
            layer.k_max,
        )
        return rewire(opt, layer, variable, weights, mask, local_score(),
                      k, layer.k_max, not layer.k_exact,
                      nonnegative_score=opt.updater.nonnegative_scores)

    ever_active = tf.reshape(
        tf.convert_to_tensor(layer.ever_active.value), [-1]
    )
    novelty = opt.novelty.value
    excluded = tf.logical_and(
        tf.logical_not(is_global),
        tf.logical_and(opt.exclude_dropped.value,
                       tf.reshape(layer.dropped.value, [-1])),
    )
    scale = opt.local_drop_scale.value

    def global_score():
        rules = [local_score, lambda: updaters.SET().grow_score(
            weights, flat_gradient, context
        ), lambda: updaters.RigL().grow_score(
            weights, flat_gradient, context
        )]
        return tf.switch_case(
            tf.convert_to_tensor(opt.global_grow_mode.value), rules
        )

    def any_fraction():
        # Global explorations and scaled local updates: k up to all
        # active weights, picks sorted.
        fraction = tf.where(is_global, opt.global_drop_fraction.value,
                            local_fraction * scale)
        k = masking.count_for(fraction, layer.num_active)
        score = tf.cond(is_global, global_score, local_score)
        return rewire(
            opt, layer, variable, weights, mask,
            masking.favour_unused(score, ever_active, novelty),
            k, layer.num_active, True, excluded, is_global,
        )

    def scheduled_fraction():
        k = tf.minimum(
            masking.count_for(local_fraction, layer.num_active),
            layer.k_max,
        )
        return rewire(
            opt, layer, variable, weights, mask,
            masking.favour_unused(local_score(), ever_active, novelty),
            k, layer.k_max, not layer.k_exact, excluded,
        )

    return tf.cond(
        tf.logical_or(is_global, tf.not_equal(scale, 1.0)),
        any_fraction, scheduled_fraction,
    )

def rewire(opt, layer, variable, weights, mask, grow_score, k, k_max,
            picks_sorted, blocked=None, is_global=None,
            nonnegative_score=False):
    """Applies one drop-and-grow to a layer's kernel, mask and slots."""
    shape = layer.shape
    old = tf.reshape(mask, [-1])
    new, vacated = masking.rewire_masks(
        weights, old, grow_score, k, k_max, picks_sorted, blocked,
        nonnegative_score,
    )
    grown_values = tf.zeros([layer.size], weights.dtype)  # a folded constant
    if is_global is not None:
        grown_values = tf.where(new, _global_grow_values(
            opt, layer, weights, old, is_global), grown_values)
    variable.assign(
        tf.reshape(tf.where(vacated, grown_values, weights), shape)
    )
    vacated_shaped = tf.reshape(vacated, shape)
    for slot, reset in layer.slots:
        slot_value = tf.convert_to_tensor(slot.value)
        slot.value.assign(
            tf.where(vacated_shaped,
                     tf.fill(shape, tf.cast(reset, slot_value.dtype)),
                     slot_value)
        )
    new_shaped = tf.reshape(new, shape)
    layer.mask.value.assign(new_shaped)
    layer.ever_active.value.assign(
        tf.logical_or(tf.convert_to_tensor(layer.ever_active.value),
                      new_shaped)
    )
    if is_global is not None:
        # Record what a global exploration removed (for the return rate
        # and the EDST exclusion lever); local updates leave it alone.
        removed = tf.reshape(
            tf.logical_and(old, tf.logical_not(new)), shape
        )
        layer.dropped.value.assign(
            tf.where(is_global, removed,
                     tf.convert_to_tensor(layer.dropped.value))
        )
    activated = tf.reduce_sum(
        tf.cast(tf.logical_and(new, tf.logical_not(old)), tf.float32)
    )
    layer.changed.value.assign(activated / float(layer.num_active))
    if layer.index == 0:
        opt.mask_updates.value.assign_add(1)
    return tf.constant(True)


def _global_grow_values(opt, layer, weights, old, is_global):
    """Start values of weights grown by a global exploration: 0 (the
    paper's), or with `global_grow_init` = c > 0, draws from N(0, (c * r)^2)
    where r is the RMS of the layer's active weights before the update
    (keyed by seed, layer and step like SET's draws)."""
    active = tf.cast(old, weights.dtype)
    rms = tf.sqrt(tf.reduce_sum(tf.square(weights) * active)
                  / tf.maximum(tf.reduce_sum(active), 1.0))
    key = tf.stack([
        tf.constant(opt.seed, tf.int64) * 65537 + layer.index + 7919,
        tf.cast(opt.iterations, tf.int64),
    ])
    noise = tf.random.stateless_normal(
        [layer.size], seed=key, alg="philox", dtype=weights.dtype
    )
    scale = tf.where(is_global, opt.global_grow_init.value, 0.0)
    return noise * rms * tf.cast(scale, weights.dtype)
