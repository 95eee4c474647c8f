"""Growth rules of dynamic sparse training, as small classes in a registry.

An updater scores the inactive weights of a layer at a mask update; the
`k` best-scoring ones are grown. Dropping is by magnitude for every rule.
`RigL` scores by the dense gradient's magnitude, `SET` at random. A new
rule is a subclass with a `grow_score` method, registered under a name:

```python
@kft.updaters.register_updater("squared_gradient")
class GradientSquared(kft.updaters.Updater):
    def grow_score(self, weights, gradient, context):
        return tf.square(gradient)

opt = kft.SparseOptimizer(keras.optimizers.SGD(0.1), grow="squared_gradient")
```
"""

import collections

import keras
import tensorflow as tf

# What an updater knows about the layer it scores: `seed` (the optimizer's),
# `layer_index` (the layer's position among the sparse layers), `step` (int64
# tensor, the optimizer's iteration) and `size` (entries of the flat layer).
UpdateContext = collections.namedtuple(
    "UpdateContext", ["seed", "layer_index", "step", "size"]
)

_REGISTRY = {}
# The names that `SparseOptimizer(grow=...)` has always taken.
ALIASES = {"gradient": "rigl", "random": "set"}


def register_updater(name):
    """Class decorator: makes an `Updater` subclass available by `name`.

    The class is also registered with Keras' serialization (package
    `keras_freetickets`), so an optimizer using it round-trips through
    `model.save("x.keras")` while the class is registered.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(
            "Argument `name` must be a non-empty string. "
            f"Received: name={name!r}"
        )

    def decorate(cls):
        if not (isinstance(cls, type) and issubclass(cls, Updater)):
            raise ValueError(
                "register_updater decorates Updater subclasses. "
                f"Received: {cls!r}"
            )
        _REGISTRY[name] = cls
        cls.registered_name = name
        keras.saving.register_keras_serializable(
            package="keras_freetickets", name=f"updater_{name}"
        )(cls)
        return cls

    return decorate


def available():
    """Names (and aliases) that `get` accepts."""
    return sorted(set(_REGISTRY) | set(ALIASES))


def get(identifier):
    """An `Updater` from a name, an alias ("gradient", "random") or itself."""
    if isinstance(identifier, Updater):
        return identifier
    if isinstance(identifier, str):
        name = ALIASES.get(identifier, identifier)
        if name in _REGISTRY:
            return _REGISTRY[name]()
    raise ValueError(
        f"Argument `grow` must be one of {available()} or an Updater. "
        f"Received: grow={identifier!r}"
    )


class Updater:
    """Base class of growth rules.

    Subclasses implement `grow_score(weights, gradient, context)`, which
    returns a non-negative float tensor of the flat layer's size: higher
    grows first. `weights` and `gradient` are flat tensors (the gradient is
    the dense one of this step, before masking); `context` is an
    `UpdateContext`. Everything runs inside the compiled train step, once per
    layer and mask update, so use TensorFlow ops and keep shapes static.
    """

    registered_name = None
    # True promises that grow_score never returns a negative value: the
    # update then ranks scores by two integer ops on their bits instead of
    # eight elementwise passes (a negative score would count as 0).
    nonnegative_scores = False

    def grow_score(self, weights, gradient, context):
        raise NotImplementedError(
            f"{type(self).__name__} must implement grow_score()"
        )

    def get_config(self):
        return {}

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def __eq__(self, other):
        return type(self) is type(other) and (
            self.get_config() == other.get_config()
        )

    def __hash__(self):
        return hash(type(self))

    def __repr__(self):
        return f"{type(self).__name__}()"


@register_updater("rigl")
class RigL(Updater):
    """RigL (Evci et al., 2020): grow where the dense gradient is largest."""

    nonnegative_scores = True

    def grow_score(self, weights, gradient, context):
        del weights, context
        return tf.cast(tf.abs(gradient), tf.float32)


@register_updater("set")
class SET(Updater):
    """SET (Mocanu et al., 2018): grow at random.

    The draw is `tf.random.stateless_uniform` with the Philox algorithm,
    keyed by seed, layer and step, so every replica and every rerun draws
    the same numbers.
    """

    nonnegative_scores = True

    def grow_score(self, weights, gradient, context):
        del weights, gradient
        key = tf.stack([
            tf.constant(context.seed, tf.int64) * 65537 + context.layer_index,
            tf.cast(context.step, tf.int64),
        ])
        return tf.random.stateless_uniform(
            [context.size], seed=key, alg="philox"
        )


def name_of(updater):
    """The name an updater is registered under (for configs and logs)."""
    return getattr(type(updater), "registered_name", None)
