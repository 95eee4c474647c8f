"""Helpers that serve the examples and benchmarks, outside the core API.

`keras_freetickets.contrib.datasets`: the offline data of BENCHMARK.md
(Fashion-MNIST from Debian's files, the digits and noise OOD sets, tfds
pipelines). `keras_freetickets.contrib.plots`: the figures of the examples
(reliability diagrams, OOD histograms, layer densities, mask overlap).
"""


def __getattr__(name):
    if name in ("datasets", "plots"):
        import importlib

        module = importlib.import_module(f"keras_freetickets.contrib.{name}")
        globals()[name] = module
        return module
    raise AttributeError(
        f"module 'keras_freetickets.contrib' has no attribute {name!r}"
    )
