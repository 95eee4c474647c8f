"""The protocols' models, shared by the benchmark scripts (see
shared/BENCHMARK.md, "FMNIST-MLP v1" and "FMNIST-CNN v1"). No flags here, so
any script may import it; the start and the report that every script shares
are in `benchkit.py`."""

PROTOCOL_NAMES = {"mlp": "FMNIST-MLP v1", "cnn": "FMNIST-CNN v1"}
L2 = 5e-4


def build_model(protocol, seed=None, l2=L2, softmax=False):
    """The protocol's model: logits out (or probabilities with `softmax`),
    Keras L2 `l2` on every kernel (None for no regularizer)."""
    import keras

    if protocol not in PROTOCOL_NAMES:
        raise ValueError(
            f"Argument `protocol` must be one of {sorted(PROTOCOL_NAMES)}. "
            f"Received: protocol={protocol!r}"
        )
    if seed is not None:
        keras.utils.set_random_seed(seed)
    reg = keras.regularizers.L2(l2) if l2 else None
    layers = keras.layers
    head = layers.Dense(10, activation="softmax" if softmax else None,
                        kernel_regularizer=reg)
    if protocol == "mlp":
        return keras.Sequential([
            keras.Input((784,)),
            layers.Dense(300, activation="relu", kernel_regularizer=reg),
            layers.Dense(100, activation="relu", kernel_regularizer=reg),
            head,
        ], name="fmnist_mlp_v1")
    return keras.Sequential([
        keras.Input((28, 28, 1)),
        layers.Conv2D(32, 3, padding="same", activation="relu",
                      kernel_regularizer=reg),
        layers.MaxPooling2D(2),
        layers.Conv2D(64, 3, padding="same", activation="relu",
                      kernel_regularizer=reg),
        layers.MaxPooling2D(2),
        layers.Flatten(),
        layers.Dense(128, activation="relu", kernel_regularizer=reg),
        head,
    ], name="fmnist_cnn_v1")
