"""Figure plumbing shared by the plots of `contrib.plots`.

Figures are made with matplotlib's object-oriented API, imported on first
use; `finish` titles a figure and writes it as a PNG.
"""

import os

import numpy as np

DPI = 100


def new_figure(rows, cols, panel_size):
    """A `Figure` of rows x cols panels of `panel_size` inches, and its axes as a flat list."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(panel_size[0] * cols, panel_size[1] * rows),
                    dpi=DPI, layout="constrained")
    axes = figure.subplots(rows, cols, squeeze=False).ravel().tolist()
    return figure, axes


def finish(figure, path, title):
    """Adds the title, writes the PNG when `path` is given, returns the figure."""
    if title:
        figure.suptitle(title, fontsize=11)
    if path is not None:
        path = os.fspath(path)
        folder = os.path.dirname(path)
        if folder:
            os.makedirs(folder, exist_ok=True)
        figure.savefig(path, format="png", dpi=DPI)
    return figure


def named_arrays(name, value, ndim, allow_empty=False):
    """{name: float64 array of rank `ndim`} from a dict of arrays or one array ("model")."""
    if not isinstance(value, dict):
        value = {"model": value}
    if not value and not allow_empty:
        raise ValueError(
            f"Argument `{name}` must hold at least one array. Received: {{}}"
        )
    result = {}
    for key, array in value.items():
        array = np.asarray(array, dtype=np.float64)
        if array.ndim != ndim or array.shape[0] == 0:
            raise ValueError(
                f"Argument `{name}` must map names to non-empty arrays of "
                f"rank {ndim}. Received for {key!r}: shape {array.shape}"
            )
        result[str(key)] = array
    return result


def short_layer(path):
    """'sequential/dense_1/kernel' -> 'dense_1' (kernel names are implied)."""
    parts = str(path).split("/")
    if len(parts) >= 2 and parts[-1] in ("kernel", "depthwise_kernel"):
        return parts[-2]
    if len(parts) >= 2:
        return "/".join(parts[-2:])
    return parts[0]
