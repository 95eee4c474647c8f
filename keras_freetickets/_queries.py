"""Read-only queries of a built SparseOptimizer's state (a mixin)."""

import numpy as np

from keras_freetickets import _keras_compat as compat


class SparseStateQueries:
    """Masks, per-layer statistics, invariants, sizes and return rates."""

    def return_rates(self):
        """How much of the last global exploration has been undone.

        Returns None before any global exploration, else
        `{"overall": r, "layers": {path: r_l}}`, where r_l is the fraction of
        the weights that the last global exploration removed from layer l
        which are active again now, and r pools all layers.
        """
        self._require_built()
        layers, back_total, removed_total = {}, 0, 0
        for layer in self._sparse_layers:
            if layer.dropped is None:
                continue
            removed = layer.dropped.numpy()
            count = int(np.count_nonzero(removed))
            if count:
                back = int(np.count_nonzero(removed & layer.mask.numpy()))
                layers[layer.path] = back / count
                back_total += back
                removed_total += count
        if not removed_total:
            return None
        return {"overall": back_total / removed_total, "layers": layers}

    def _require_built(self):
        if not self.built:
            raise ValueError(
                "The SparseOptimizer is not built yet: call "
                "`optimizer.build(model.trainable_variables)` or train first."
            )

    @property
    def sparse_layers(self):
        return list(self._sparse_layers)

    def get_masks(self):
        """Returns {variable path: 0/1 float32 array} for every prunable weight.

        Weights that the distribution left dense get an all-ones mask.
        """
        self._require_built()
        masks = {}
        for variable in self._dense_prunable:
            masks[variable.path] = np.ones(variable.shape, np.float32)
        for layer in self._sparse_layers:
            masks[layer.path] = layer.mask.numpy().astype(np.float32)
        return masks

    def layer_stats(self):
        """Per prunable weight: shape, density, active, total, mask changed at
        the last update, and fraction of weights ever activated."""
        self._require_built()
        stats = []
        for variable in self._dense_prunable:
            size = int(np.prod(variable.shape))
            stats.append(dict(
                path=variable.path, shape=tuple(variable.shape), density=1.0,
                active=size, total=size, target_active=size,
                mask_changed=0.0, ever_active=1.0,
            ))
        for layer in self._sparse_layers:
            active = int(np.count_nonzero(layer.mask.numpy()))
            stats.append(dict(
                path=layer.path, shape=layer.shape,
                density=active / layer.size, active=active, total=layer.size,
                target_active=layer.num_active,
                mask_changed=float(layer.changed.numpy()),
                ever_active=float(
                    np.count_nonzero(layer.ever_active.numpy()) / layer.size
                ),
            ))
        order = {v.path: i for i, v in enumerate(compat.optimizer_trainable_variables(self))}
        return sorted(stats, key=lambda s: order.get(s["path"], 0))

    def check_invariants(self):
        """Returns a list of violated mask invariants (empty when all hold).

        Each sparse layer must hold exactly its target number of active
        weights, and every weight outside its mask must be exactly 0.
        """
        self._require_built()
        problems = []
        for layer in self._sparse_layers:
            mask = layer.mask.numpy()
            active = int(np.count_nonzero(mask))
            if active != layer.num_active:
                problems.append(
                    f"{layer.path}: {active} active weights, expected "
                    f"{layer.num_active}"
                )
            outside = int(np.count_nonzero(layer.variable.numpy()[~mask]))
            if outside:
                problems.append(
                    f"{layer.path}: {outside} nonzero weights outside the mask"
                )
        return problems

    def state_bytes(self):
        """Bytes of the wrapper's own state (masks, records, counters)."""
        self._require_built()
        return int(sum(
            np.prod(v.shape) * np.dtype(v.dtype).itemsize
            for v in compat.optimizer_own_variables(self)
        ))

    def overall_stats(self, stats=None):
        """Totals over all prunable weights: `active`, `total`, `density`
        (active / total) and `ever_active` (fraction ever active), from
        `layer_stats()` (or the `stats` given)."""
        stats = self.layer_stats() if stats is None else stats
        active = sum(s["active"] for s in stats)
        total = sum(s["total"] for s in stats)
        ever = sum(s["ever_active"] * s["total"] for s in stats)
        return {"active": active, "total": total, "density": active / total,
                "ever_active": ever / total}

