"""FreeTickets for Keras 3: ensembles of sparse networks grown by dynamic sparse training.

The public API is what this module exports (`__all__`): the optimizer, the
callbacks, the ensemble, member I/O, prunable marking, and the modules
`metrics`, `flops`, `distributions`, `schedules`, `updaters`, `members`,
`distributed`, `export` and `native`. Helpers for the examples and benchmarks live in
`keras_freetickets.contrib` (`datasets`, `plots`). Names that need
TensorFlow are loaded on first use, so that `import keras_freetickets.metrics`
(pure numpy) and the example scripts' flag checks stay fast.
"""

__version__ = "0.2.0"

_LAZY = {
    "BackupAndRestore": "keras_freetickets.backup",
    "SparseOptimizer": "keras_freetickets.sparse_optimizer",
    "SparsityMonitor": "keras_freetickets.sparsity_monitor",
    "sparsity_summary": "keras_freetickets.sparsity_monitor",
    "EDSTCallback": "keras_freetickets.edst",
    "train_dst_ensemble": "keras_freetickets.dst",
    "FreeTicketsEnsemble": "keras_freetickets.ensemble",
    "save_member": "keras_freetickets.members",
    "load_member": "keras_freetickets.members",
    "mark_prunable": "keras_freetickets.prunable",
    "mark_not_prunable": "keras_freetickets.prunable",
    "register_prunable_name": "keras_freetickets.prunable",
    "register_updater": "keras_freetickets.updaters",
    "UpdateSchedule": "keras_freetickets.schedules",
}
_PUBLIC_MODULES = (
    "distributed", "distributions", "export", "flops", "members", "metrics",
    "native", "schedules", "updaters",
)
# Importable as attributes too, but not part of the public API.
_OTHER_MODULES = (
    "contrib", "dst", "edst", "ensemble", "prunable", "sparse_optimizer",
    "sparsity_monitor",
)

__all__ = sorted(list(_LAZY) + list(_PUBLIC_MODULES))


def __getattr__(name):
    import importlib

    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    if name in _PUBLIC_MODULES or name in _OTHER_MODULES:
        module = importlib.import_module(f"keras_freetickets.{name}")
        globals()[name] = module
        return module
    if name in ("datasets", "plots"):
        raise AttributeError(
            f"keras_freetickets.{name} moved to keras_freetickets.contrib."
            f"{name}: use `from keras_freetickets.contrib import {name}`"
        )
    raise AttributeError(f"module 'keras_freetickets' has no attribute {name!r}")


def __dir__():
    return __all__
