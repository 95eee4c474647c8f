"""The example networks, each returning logits, with L2 on every kernel.

- `mlp`: Flatten, Dense 300 ReLU, Dense 100 ReLU, Dense C (FMNIST-MLP v1).
- `cnn`: Conv 32 3x3 ReLU, MaxPool, Conv 64 3x3 ReLU, MaxPool, Flatten,
  Dense 128 ReLU, Dense C (FMNIST-CNN v1).
- `resnet20`: the CIFAR ResNet-20 of He et al. (2016): 3 stages of 3 basic
  blocks, 16/32/64 channels, about 0.27 M weights.
- `wrn28_10`: Wide ResNet-28-10 (Zagoruyko and Komodakis, 2016), the
  FreeTickets paper's CIFAR model: 3 stages of 4 pre-activation blocks,
  160/320/640 channels, about 36.5 M weights. Meant for accelerators.

Biases and batch-normalization weights are never pruned (see
`keras_freetickets.prunable`); the first convolution of the ResNets is
pruned like the others, as in RigL's ERK setting.
"""

import keras
from keras import layers


def build_model(name, input_shape, num_classes, l2=5e-4, seed=None):
    """Builds an uncompiled example network.

    Args:
        name: str. One of "mlp", "cnn", "resnet20", "wrn28_10".
        input_shape: tuple (height, width, channels).
        num_classes: int. Number of output logits.
        l2: float. L2 penalty on every kernel.
        seed: int or None. Seeds the initializers (through
            `keras.utils.set_random_seed`, done by the caller).

    Returns:
        A `keras.Model` with logits output.
    """
    del seed  # the caller seeds Keras' global generator
    builders = {
        "mlp": _mlp, "cnn": _cnn, "resnet20": _resnet20,
        "wrn28_10": lambda *a: _wide_resnet(*a, depth=28, width=10),
    }
    if name not in builders:
        raise ValueError(
            f"Argument `name` must be one of {sorted(builders)}. "
            f"Received: name={name!r}"
        )
    regularizer = keras.regularizers.L2(l2) if l2 else None
    return builders[name](tuple(input_shape), int(num_classes), regularizer)


def _mlp(input_shape, num_classes, reg):
    return keras.Sequential([
        keras.Input(input_shape),
        layers.Flatten(),
        layers.Dense(300, activation="relu", kernel_regularizer=reg),
        layers.Dense(100, activation="relu", kernel_regularizer=reg),
        layers.Dense(num_classes, kernel_regularizer=reg),
    ], name="mlp")


def _cnn(input_shape, num_classes, reg):
    return keras.Sequential([
        keras.Input(input_shape),
        layers.Conv2D(32, 3, padding="same", activation="relu",
                      kernel_regularizer=reg),
        layers.MaxPooling2D(2),
        layers.Conv2D(64, 3, padding="same", activation="relu",
                      kernel_regularizer=reg),
        layers.MaxPooling2D(2),
        layers.Flatten(),
        layers.Dense(128, activation="relu", kernel_regularizer=reg),
        layers.Dense(num_classes, kernel_regularizer=reg),
    ], name="cnn")


def _conv(filters, kernel, strides, reg):
    return layers.Conv2D(filters, kernel, strides=strides, padding="same",
                         use_bias=False, kernel_initializer="he_normal",
                         kernel_regularizer=reg)


def _resnet20(input_shape, num_classes, reg):
    inputs = keras.Input(input_shape)
    x = _conv(16, 3, 1, reg)(inputs)
    x = layers.BatchNormalization()(x)
    x = layers.ReLU()(x)
    for stage, filters in enumerate((16, 32, 64)):
        for block in range(3):
            strides = 2 if stage > 0 and block == 0 else 1
            shortcut = x
            y = _conv(filters, 3, strides, reg)(x)
            y = layers.BatchNormalization()(y)
            y = layers.ReLU()(y)
            y = _conv(filters, 3, 1, reg)(y)
            y = layers.BatchNormalization()(y)
            if strides != 1 or shortcut.shape[-1] != filters:
                shortcut = _conv(filters, 1, strides, reg)(shortcut)
                shortcut = layers.BatchNormalization()(shortcut)
            x = layers.ReLU()(layers.Add()([y, shortcut]))
    x = layers.GlobalAveragePooling2D()(x)
    outputs = layers.Dense(num_classes, kernel_regularizer=reg)(x)
    return keras.Model(inputs, outputs, name="resnet20")


def _wide_resnet(input_shape, num_classes, reg, depth=28, width=10):
    if (depth - 4) % 6:
        raise ValueError(
            f"Wide ResNet depth must be 6n + 4. Received: depth={depth}"
        )
    blocks = (depth - 4) // 6
    inputs = keras.Input(input_shape)
    x = _conv(16, 3, 1, reg)(inputs)
    for stage, filters in enumerate((16 * width, 32 * width, 64 * width)):
        for block in range(blocks):
            strides = 2 if stage > 0 and block == 0 else 1
            pre = layers.ReLU()(layers.BatchNormalization()(x))
            if strides != 1 or x.shape[-1] != filters:
                shortcut = _conv(filters, 1, strides, reg)(pre)
            else:
                shortcut = x
            y = _conv(filters, 3, strides, reg)(pre)
            y = layers.ReLU()(layers.BatchNormalization()(y))
            y = _conv(filters, 3, 1, reg)(y)
            x = layers.Add()([y, shortcut])
    x = layers.ReLU()(layers.BatchNormalization()(x))
    x = layers.GlobalAveragePooling2D()(x)
    outputs = layers.Dense(num_classes, kernel_regularizer=reg)(x)
    return keras.Model(inputs, outputs, name=f"wrn{depth}_{width}")
