"""Tiny models and data shared by the EDST test modules."""

import keras
import numpy as np


def small_model(seed=0, classes=4, features=16, hidden=48):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([
        keras.Input((features,)),
        keras.layers.Dense(hidden, activation="relu"),
        keras.layers.Dense(classes),
    ])


def toy_data(n=640, features=16, classes=4):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, features)).astype("float32")
    return x, x[:, :classes].argmax(1).astype("int64")
