"""FreeTickets for Keras 3: ensembles of sparse networks grown by dynamic sparse training.

The public API is what this module exports. Names that need TensorFlow are
loaded on first use, so that `import keras_freetickets.metrics` (pure numpy)
and the example scripts' flag checks stay fast.
"""

__version__ = "0.1.0"

_LAZY = {
    "BackupAndRestore": "keras_freetickets.backup",
    "SparseOptimizer": "keras_freetickets.sparse_optimizer",
    "SparsityMonitor": "keras_freetickets.sparsity_monitor",
    "sparsity_summary": "keras_freetickets.sparsity_monitor",
    "mark_prunable": "keras_freetickets.prunable",
    "mark_not_prunable": "keras_freetickets.prunable",
    "register_prunable_name": "keras_freetickets.prunable",
    "EDSTCallback": "keras_freetickets.edst",
    "train_dst_ensemble": "keras_freetickets.dst",
    "FreeTicketsEnsemble": "keras_freetickets.ensemble",
    "save_member": "keras_freetickets.members",
    "load_member": "keras_freetickets.members",
}
_SUBMODULES = (
    "datasets", "distributed", "distributions", "dst", "edst", "ensemble",
    "export", "flops", "members", "metrics", "plots", "prunable", "schedules",
    "sparse_optimizer", "sparsity_monitor",
)

__all__ = sorted(list(_LAZY) + list(_SUBMODULES))


def __getattr__(name):
    import importlib

    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        module = importlib.import_module(f"keras_freetickets.{name}")
        globals()[name] = module
        return module
    raise AttributeError(f"module 'keras_freetickets' has no attribute {name!r}")


def __dir__():
    return __all__
