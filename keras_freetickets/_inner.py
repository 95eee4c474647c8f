"""Which inner optimizers `SparseOptimizer` can wrap, their slots, its build."""

import contextlib

import keras
import tensorflow as tf

from keras_freetickets import _keras_compat as compat
from keras_freetickets import native

# Optimizers whose update keeps a weight at exactly zero when its gradient and
# all its slots are zero (every term of their update is a product with, or a
# ratio over, the masked gradient or a slot). For these no re-mask is needed
# after the inner update. Any other optimizer gets an explicit re-mask.
ZERO_PRESERVING = {
    "SGD", "Adam", "AdamW", "Adamax", "Nadam", "RMSprop", "Lion", "Adagrad",
    "Adadelta", "Lamb",
}
# Optimizers whose per-variable state cannot be masked entry by entry.
REFUSED = {
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


def check_inner_optimizer(inner):
    if not isinstance(inner, keras.optimizers.Optimizer):
        raise ValueError(
            "Argument `inner_optimizer` must be a Keras 3 optimizer "
            "(an instance of `keras.optimizers.Optimizer`). Received: "
            f"inner_optimizer={inner!r} of type {type(inner).__name__}"
        )
    for cls in type(inner).__mro__:
        if cls.__name__ in REFUSED:
            raise ValueError(
                f"SparseOptimizer cannot wrap {type(inner).__name__}: "
                f"{REFUSED[cls.__name__]}. Received: inner_optimizer={inner!r}"
            )
    if type(inner).__name__ == "SparseOptimizer":
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


def slot_owners(var_list, optimizer_variables):
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


def slot_reset_values(inner):
    """Value a slot is reset to for a regrown weight (Adagrad's is not 0)."""
    name = type(inner).__name__

    def reset_value(slot):
        if name == "Adagrad" and slot.name.endswith("_accumulator"):
            return float(inner.initial_accumulator_value)
        return 0.0

    return reset_value


def masked_gradient(gradient, mask):
    """`where(mask, gradient, 0)` for a dense gradient of `mask`'s shape."""
    # TF's same-shape Select runs about 45 us faster on a 784x300 kernel
    # than `tf.where` (SelectV2, broadcasting): 1.2% of an FMNIST-MLP v1
    # step. Static-shape zeros are a folded constant.
    zeros = (tf.zeros(gradient.shape, gradient.dtype)
             if gradient.shape.is_fully_defined()
             else tf.zeros_like(gradient))
    return tf.raw_ops.Select(condition=mask, x=gradient, y=zeros)


def fused_sgd_update(inner, gradient, variable, learning_rate, mask=None):
    """Applies `keras.optimizers.SGD`'s update to `variable` as one kernel.

    Keras's SGD runs its momentum update as five elementwise ops (two
    multiplies, a subtract, an assign and an add); TensorFlow's
    `ResourceApplyKerasMomentum` (or `ResourceApplyGradientDescent` without
    momentum) computes the same expressions in one pass. With no fused
    multiply-add in either, the result is the same bit for bit
    (tests/test_fused_sgd.py compares fits with Keras's update). On the
    masked kernels this pays for the gradient select: the FMNIST-MLP v1
    ordinary step read 1.03-1.08x a dense one in six benchmark runs,
    against 1.05-1.27x with Keras's update in six runs before
    (benchmarks/SPEED.md, "The fused SGD update").

    With a bool `mask`, the update is given `where(mask, gradient, 0)`:
    where the compiled library is built (`native.masked_sgd_update`), select
    and update are one op and one pass over the kernel, with the same bits
    (tests/test_native.py); else `masked_gradient` and TensorFlow's op.

    Returns False, having done nothing, where Keras's own update must run:
    an optimizer other than SGD itself (a subclass may change the update),
    a distribution strategy (the slots are mirrored), sliced or cast
    gradients, and XLA (which fuses the ops itself).
    """
    if (type(inner) is not keras.optimizers.SGD
            or tf.distribute.has_strategy()
            or not isinstance(gradient, tf.Tensor)
            or not isinstance(variable, tf.Variable)
            or gradient.dtype != variable.dtype
            or variable.dtype not in (tf.float32, tf.float64)
            or compat.in_xla_context()):
        return False
    learning_rate = tf.cast(learning_rate, variable.dtype)
    momentum = None
    if inner.momentum != 0:
        momentum = compat.sgd_momentum(inner, variable)
        if isinstance(momentum, keras.Variable):
            momentum = momentum.value
    if mask is not None:
        if native.masked_sgd_update(variable, momentum, learning_rate,
                                    gradient, mask, inner.momentum,
                                    inner.nesterov):
            return True
        gradient = masked_gradient(gradient, mask)
    if momentum is None:
        tf.raw_ops.ResourceApplyGradientDescent(
            var=variable.handle, alpha=learning_rate, delta=gradient)
        return True
    tf.raw_ops.ResourceApplyKerasMomentum(
        var=variable.handle, accum=momentum.handle, lr=learning_rate,
        grad=gradient, momentum=tf.constant(inner.momentum, variable.dtype),
        use_nesterov=bool(inner.nesterov))
    return True


def build_eagerly(optimizer, variables):
    """Builds `optimizer` for `variables`, eagerly even inside a traced step.

    Without a distribution strategy Keras leaves the optimizer unbuilt until
    the first train step is traced. Its variables are then made under
    `tf.init_scope`, so that their initial values (the masks) stay out of the
    graph, and with `tf.function`'s variable lifting turned off: a function
    whose first trace creates variables is traced a second time, so lifting
    would trace the whole train step twice (the first step of an FMNIST-MLP
    v1 fit: 0.57-0.72 s traced twice, 0.44-0.54 s once). Lifting has nothing
    to do for a variable made eagerly. Under a strategy Keras has built the
    optimizer in the strategy's scope before tracing, and the variables are
    made where they are asked for.
    """
    outside_trace = contextlib.ExitStack()
    if not tf.distribute.has_strategy():
        outside_trace.enter_context(tf.init_scope())
        outside_trace.enter_context(tf.variable_creator_scope(_unlifted))
    with outside_trace, keras.name_scope(optimizer.name, caller=optimizer):
        optimizer.build(variables)


def _unlifted(next_creator, **kwargs):
    kwargs["experimental_enable_variable_lifting"] = False
    return next_creator(**kwargs)
