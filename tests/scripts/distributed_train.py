"""Trains a sparse MLP on 1 and 2 logical CPU devices; writes masks to .npz.

Run by tests/test_distributed.py in a subprocess, because splitting the CPU
into logical devices and setting a mixed-precision policy bind the whole
process.

    python distributed_train.py replicas OUT.npz   # fit on 2 vs 1 devices,
                                                   # custom loop, jit
    python distributed_train.py mixed OUT.npz      # mixed_float16 policy

Every run uses the same data (no shuffle), global batch, initial weights and
optimizer seed, so the 1- and 2-device runs differ only in how the gradient
of a global batch is summed.
"""

import sys

import numpy as np

import _training_common as _common

GLOBAL_BATCH = 64
STEPS = 200
UPDATE_INTERVAL = 10
SPARSITY = 0.8
SIZES = (20, 64, 32, 3)


def sparse_optimizer(grow):
    import keras
    import keras_freetickets as kft

    return kft.SparseOptimizer(
        keras.optimizers.SGD(0.05, momentum=0.9), sparsity=SPARSITY,
        grow=grow, drop_fraction=0.3, update_interval=UPDATE_INTERVAL, seed=3,
    )


def initial_weights():
    """Weights of a freshly initialized MLP, built outside any strategy."""
    return [w.numpy() for w in _common.make_mlp(SIZES, seed=1).weights]


def fit_run(strategy, grow, init, x, y, jit=False, steps_per_execution=1):
    with strategy.scope():
        model = _common.make_mlp(SIZES, seed=1)
        model.set_weights(init)
        opt = sparse_optimizer(grow)
        model.compile(
            optimizer=opt, loss=_common.loss_fn(), jit_compile=jit,
            steps_per_execution=steps_per_execution,
        )
    epochs = STEPS * GLOBAL_BATCH // len(x)
    model.fit(x, y, batch_size=GLOBAL_BATCH, epochs=epochs, shuffle=False,
              verbose=0)
    return model, opt


def custom_loop_run(strategy, init, x, y):
    import tensorflow as tf

    import keras

    loss_object = keras.losses.SparseCategoricalCrossentropy(
        from_logits=True, reduction="none"
    )
    with strategy.scope():
        model = _common.make_mlp(SIZES, seed=1)
        model.set_weights(init)
        opt = sparse_optimizer("gradient")
        opt.build(model.trainable_variables)
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(
        GLOBAL_BATCH, drop_remainder=True
    )
    dataset = strategy.experimental_distribute_dataset(dataset)

    def replica_step(features, labels):
        with tf.GradientTape() as tape:
            logits = model(features, training=True)
            loss = tf.nn.compute_average_loss(
                loss_object(labels, logits), global_batch_size=GLOBAL_BATCH
            )
        grads = tape.gradient(loss, model.trainable_variables)
        opt.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    @tf.function
    def train_step(features, labels):
        losses = strategy.run(replica_step, args=(features, labels))
        return strategy.reduce("SUM", losses, axis=None)

    steps = 0
    while steps < STEPS:
        for features, labels in dataset:
            train_step(features, labels)
            steps += 1
            if steps == STEPS:
                break
    return model, opt


def run_replicas(out_path):
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * 2
    )
    two = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    one = tf.distribute.get_strategy()
    x, y = _common.make_data(20 * GLOBAL_BATCH, features=SIZES[0],
                             classes=SIZES[-1])
    init = initial_weights()
    arrays, meta = {}, {}
    for grow in ("gradient", "random"):
        for name, strategy in (("two", two), ("one", one)):
            model, opt = fit_run(strategy, grow, init, x, y)
            prefix = f"fit_{grow}_{name}"
            meta[prefix] = _common.record_optimizer(
                arrays, prefix, strategy, model, opt
            )
    model, opt = custom_loop_run(two, init, x, y)
    meta["loop_two"] = _common.record_optimizer(
        arrays, "loop_two", two, model, opt
    )
    model, opt = fit_run(one, "gradient", init, x, y, jit=True,
                         steps_per_execution=4)
    meta["jit_one"] = _common.record_optimizer(
        arrays, "jit_one", one, model, opt
    )
    meta["jit_one"]["jit_compile"] = bool(model.jit_compile)
    meta["devices"] = [d.name for d in tf.config.list_logical_devices("CPU")]
    _common.save(out_path, arrays, meta)


def run_mixed(out_path):
    import keras
    import tensorflow as tf

    import keras_freetickets as kft

    keras.mixed_precision.set_global_policy("mixed_float16")
    x, y = _common.make_data(10 * GLOBAL_BATCH, features=SIZES[0],
                             classes=SIZES[-1])
    model = _common.make_mlp(SIZES, seed=1)
    opt = sparse_optimizer("gradient")
    model.compile(optimizer=opt, loss=_common.loss_fn())
    history = model.fit(x, y, batch_size=GLOBAL_BATCH, epochs=30,
                        shuffle=False, verbose=0)
    strategy = tf.distribute.get_strategy()
    arrays = {}
    info = _common.record_optimizer(arrays, "mixed", strategy, model, opt)
    info.update(
        wrapper=type(model.optimizer).__name__,
        found_is_opt=kft.sparsity_monitor.find_sparse_optimizer(model) is opt,
        kernel_dtypes=[layer.variable.dtype for layer in opt.sparse_layers],
        compute_dtype=model.layers[0].compute_dtype,
        first_loss=float(history.history["loss"][0]),
        last_loss=float(history.history["loss"][-1]),
        loss_scale=float(np.array(model.optimizer.scale_loss(1.0))),
    )
    _common.save(out_path, arrays, {"mixed": info})


def main(argv):
    case, out_path = argv[1], argv[2]
    {"replicas": run_replicas, "mixed": run_mixed}[case](out_path)


if __name__ == "__main__":
    main(sys.argv)
