"""`train_dst_ensemble`: M independent sparse runs, each saved as a member."""

import contextlib
import math
import os

import keras

from keras_freetickets import members as members_lib
from keras_freetickets._validation import check_fraction
from keras_freetickets._validation import check_int
from keras_freetickets.member_checkpoint import MemberCheckpoint
from keras_freetickets.sparse_optimizer import SparseOptimizer

# Part of dst's API: which members of a run are still to be trained.
missing_members = members_lib.missing_members

MEMBER_INDEX_ENV = "KFT_MEMBER_INDEX"


def _default_optimizer():
    return keras.optimizers.SGD(0.05, momentum=0.9)


def train_dst_ensemble(
    build_model,
    train_data,
    num_members=3,
    seeds=None,
    sparsity=0.8,
    member_dir="members",
    member_index=None,
    epochs=1,
    batch_size=None,
    optimizer=None,
    loss=None,
    metrics=None,
    validation_data=None,
    callbacks=None,
    update_end_fraction=0.75,
    verbose="auto",
    strategy=None,
    **sparse_kwargs,
):
    """Trains a DST Ensemble: M sparse runs with distinct seeds.

    Each member gets its own seed, hence its own initial weights and masks,
    and is trained with a fresh `SparseOptimizer`, then saved atomically as
    `member_dir/member_<i>.kftm`. A member whose file exists is not trained
    again, so an interrupted call can simply be rerun. With `member_index`
    (or the `KFT_MEMBER_INDEX` environment variable) only that member is
    trained, so members can train in parallel in separate processes or on
    separate machines sharing `member_dir`.

    Keras numbers layer names from a global counter; the session is cleared
    before each member is built, so layer names (and the `overrides` that use
    them) are the same for every member.

    Args:
        build_model: callable returning an uncompiled Keras model; it may take
            the member's seed as its only argument.
        train_data: a `tf.data.Dataset` of (x, y) batches, or a tuple
            `(x, y)` of arrays (then pass `batch_size`).
        num_members: int >= 1.
        seeds: list of `num_members` distinct ints (default 0..M-1).
        sparsity: float in [0, 1).
        member_dir: directory for the member files.
        member_index: int or None. Train only this member.
        epochs: int >= 1, per member.
        batch_size: int, for array inputs.
        optimizer: callable returning a fresh inner Keras optimizer (default
            SGD(0.05, momentum=0.9)).
        loss: loss for `compile` (default sparse categorical cross-entropy
            from logits).
        metrics: metrics for `compile`.
        validation_data: passed to `fit`.
        callbacks: list of callbacks, or a callable `(member_index) -> list`.
        update_end_fraction: float in (0, 1]. Mask updates stop after this
            fraction of each member's steps (when the step count is known).
        verbose: passed to `fit`.
        strategy: a `tf.distribute.Strategy` or None. Each member's model
            and optimizer are built in its scope (after the session is
            cleared, which would drop an enclosing scope).
        **sparse_kwargs: further `SparseOptimizer` arguments (distribution,
            grow, drop_fraction, update_interval, overrides, ...).

    Returns:
        A dict with `"paths"` (every member's file, in index order),
        `"trained"` (indices trained by this call) and `"histories"`
        (index -> History.history of the members trained now).

    Example:

    ```python
    result = kft.train_dst_ensemble(build_model, train_ds, num_members=3,
                                    sparsity=0.8, member_dir="dst_members",
                                    epochs=30)
    ensemble = kft.FreeTicketsEnsemble.from_directory("dst_members")
    ```
    """
    if not callable(build_model):
        raise ValueError(
            "Argument `build_model` must be a callable returning a Keras "
            f"model. Received: build_model={build_model!r}"
        )
    check_int("num_members", num_members, 1)
    check_int("epochs", epochs, 1)
    if seeds is None:
        seeds = list(range(num_members))
    seeds = [int(s) for s in seeds]
    if len(seeds) != num_members or len(set(seeds)) != num_members:
        raise ValueError(
            f"Argument `seeds` must hold {num_members} distinct integers "
            f"(one per member). Received: seeds={seeds}"
        )
    if member_index is None and os.environ.get(MEMBER_INDEX_ENV):
        member_index = int(os.environ[MEMBER_INDEX_ENV])
    if member_index is not None:
        check_int("member_index", member_index, 0)
        if member_index >= num_members:
            raise ValueError(
                f"Argument `member_index` must be < num_members "
                f"({num_members}). Received: member_index={member_index}"
            )
    check_fraction("update_end_fraction", update_end_fraction)
    for key in ("seed", "total_steps", "update_end_step"):
        if key in sparse_kwargs:
            raise ValueError(
                f"train_dst_ensemble sets `{key}` itself; do not pass it."
            )
    steps = _steps_per_epoch(train_data, batch_size)
    os.makedirs(member_dir, exist_ok=True)

    indices = range(num_members) if member_index is None else [member_index]
    trained, histories = [], {}
    for index in indices:
        path = members_lib.member_path(member_dir, index)
        if os.path.exists(path):
            continue
        seed = seeds[index]
        keras.backend.clear_session()
        keras.utils.set_random_seed(seed)
        scope = strategy.scope() if strategy is not None else (
            contextlib.nullcontext()
        )
        with scope:
            model, opt = _build_member(
                build_model, seed, steps, epochs, update_end_fraction,
                optimizer, sparsity, loss, metrics, sparse_kwargs,
            )
        member_callbacks = callbacks(index) if callable(callbacks) else (
            list(callbacks or [])
        )
        # Saves the member at the end of training, after the user's
        # callbacks (an EarlyStopping may restore its best weights first).
        saver = MemberCheckpoint(member_dir, indices=[index],
                                 metadata=_member_metadata(opt, seed, epochs,
                                                           sparsity))
        fit_args = dict(epochs=epochs, validation_data=validation_data,
                        callbacks=member_callbacks + [saver], verbose=verbose)
        if isinstance(train_data, tuple):
            history = model.fit(train_data[0], train_data[1],
                                batch_size=batch_size, shuffle=True,
                                **fit_args)
        else:
            # A dataset brings its own order; Keras' shuffle=True only warns.
            history = model.fit(train_data, shuffle=False, **fit_args)
        trained.append(index)
        histories[index] = history.history
    return {
        "paths": [members_lib.member_path(member_dir, i)
                  for i in range(num_members)],
        "trained": trained,
        "histories": histories,
    }


def _build_member(build_model, seed, steps, epochs, update_end_fraction,
                  optimizer, sparsity, loss, metrics, sparse_kwargs):
    model = _call_build(build_model, seed)
    end_step = None
    if steps is not None:
        end_step = int(math.floor(update_end_fraction * epochs * steps))
        start = sparse_kwargs.get(
            "update_start_step", sparse_kwargs.get("update_interval", 100)
        )
        end_step = end_step if end_step > start else None
    opt = SparseOptimizer(
        optimizer() if optimizer else _default_optimizer(),
        sparsity=sparsity, seed=seed, update_end_step=end_step,
        **sparse_kwargs,
    )
    model.compile(
        optimizer=opt,
        loss=loss or keras.losses.SparseCategoricalCrossentropy(
            from_logits=True
        ),
        metrics=metrics,
    )
    return model, opt


def _member_metadata(opt, seed, epochs, sparsity):
    def metadata(index, epoch, logs):
        del epoch, logs
        overall = opt.overall_stats()
        return {"method": "dst", "member_index": index, "seed": seed,
                "epochs": epochs, "sparsity": sparsity,
                "density": overall["density"],
                "ever_active": overall["ever_active"]}

    return metadata


def _call_build(build_model, seed):
    try:
        import inspect

        takes_seed = len(inspect.signature(build_model).parameters) >= 1
    except (TypeError, ValueError):
        takes_seed = False
    model = build_model(seed) if takes_seed else build_model()
    if not isinstance(model, keras.Model):
        raise ValueError(
            "Argument `build_model` must return a Keras model. Received: "
            f"{type(model).__name__}"
        )
    return model


def _steps_per_epoch(train_data, batch_size):
    if isinstance(train_data, tuple):
        if len(train_data) != 2 or batch_size is None:
            raise ValueError(
                "Array training data must be a tuple (x, y) with a "
                f"`batch_size`. Received: a tuple of {len(train_data)} and "
                f"batch_size={batch_size!r}"
            )
        return int(math.ceil(len(train_data[0]) / batch_size))
    try:
        cardinality = int(train_data.cardinality())
        return cardinality if cardinality > 0 else None
    except (AttributeError, TypeError):
        return None

