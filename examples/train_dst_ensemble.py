"""Trains a DST Ensemble (FreeTickets, Liu et al. 2022): M independent sparse runs.

Each member is its own dynamic-sparse-training run (`kft.train_dst_ensemble`
with a `kft.SparseOptimizer`: ERK per-layer densities, RigL or SET mask
updates, no mask update in the last 25% of the steps), with seed
--seed + i, hence its own initial weights and masks, for --epochs epochs
(learning rate x0.1 at 50% and ~77% of them). Members already in
<output_dir>/dst from an earlier run with the same flags are kept, so an
interrupted run resumes by running the same command again. With
--dense_baseline a single dense model of the same architecture is trained
for --epochs too. Then (--evaluate) everything is scored on the test set and
two out-of-distribution sets, the table is printed, and results.json and the
PNG plots are written to --output_dir.

Example (offline, 2 CPU cores; M=3 runs of 10 epochs take ~4 minutes):

  python examples/train_dst_ensemble.py --output_dir=runs/dst \\
      --num_members=3 --epochs=10

Output: <output_dir>/dst/member_<i>.kftm, dense/member_0.kftm, run.json,
results.json and the PNG plots.
"""

import inspect
import os
import time

from absl import flags

import common

common.define(
    *common.DATA_FLAGS, *common.MODEL_FLAGS, *common.SPARSE_FLAGS,
    *common.OPTIMIZER_FLAGS, "num_members", "epochs", *common.RUN_FLAGS,
    output_dir="runs/dst",
)
flags.adopt_module_key_flags(common)
FLAGS = flags.FLAGS

RECORDED_FLAGS = (
    "dataset", "data_dir", "train_examples", "eval_examples", "batch_size",
    "seed", "model", "l2", "augment", "sparsity", "distribution", "grow",
    "drop_fraction", "update_interval", "learning_rate", "momentum",
    "num_members", "epochs", "strategy", "dense_baseline",
)
# Flags that change what a member is: members of an earlier run with other
# values are trained again.
MEMBER_FLAGS = tuple(f for f in RECORDED_FLAGS if f not in (
    "eval_examples", "num_members", "dense_baseline", "strategy"))


def main(argv):
    common.check_no_arguments(argv)
    # Everything a flag alone can get wrong is checked before TensorFlow loads.
    output_dir = common.check_output_dir(FLAGS.output_dir)
    common.check_dataset_name(FLAGS.dataset, FLAGS.data_dir)

    import keras
    import tensorflow as tf

    import data
    import models
    import training
    import keras_freetickets as kft
    from keras_freetickets import distributed

    started = time.time()
    verbose = common.verbose_value(FLAGS.verbose)
    num_members = FLAGS.num_members
    if FLAGS.strategy == "multi_worker":
        # The members are independent runs: worker r of W trains members
        # r, r + W, ... on its own (no collective), the chief assembles them.
        info = distributed.task_info()
        my_members = list(range(info["worker_rank"], num_members,
                                info["num_workers"]))
        strategy = tf.distribute.get_strategy()
    else:
        my_members = list(range(num_members))
        strategy = training.make_strategy(FLAGS.strategy, FLAGS.tpu)
    augment = FLAGS.augment == "crop_flip" or (
        FLAGS.augment == "auto" and FLAGS.model in ("resnet20", "wrn28_10")
    )
    dataset = data.load_training_data(
        FLAGS.dataset, FLAGS.data_dir, FLAGS.batch_size, FLAGS.train_examples,
        FLAGS.eval_examples, FLAGS.seed, augment,
        drop_remainder=training.is_tpu(strategy),
    )

    def build_model():
        return models.build_model(FLAGS.model, dataset.input_shape,
                                  dataset.num_classes, FLAGS.l2)

    def inner_optimizer():
        return keras.optimizers.SGD(FLAGS.learning_rate,
                                    momentum=FLAGS.momentum)

    # train_dst_ensemble clears the Keras session before each member, which
    # drops a surrounding `strategy.scope()`: the strategy must reach it as
    # an argument, so that it builds each member in the scope.
    distribute = {}
    if strategy is not tf.distribute.get_strategy():
        if "strategy" not in inspect.signature(
            kft.train_dst_ensemble
        ).parameters:
            raise common.ExampleError(
                f"flag --strategy={FLAGS.strategy}: this keras_freetickets "
                "version's train_dst_ensemble takes no `strategy` argument, "
                "so DST members train on one device only; use "
                "--strategy=default, or --strategy=multi_worker (one member "
                "per worker)"
            )
        distribute["strategy"] = strategy

    # Each member's step and mask-update counts go to a file beside it, with
    # the flags that made it: a rerun keeps the members made the same way.
    member_dir = os.path.join(output_dir, "dst")
    os.makedirs(member_dir, exist_ok=True)
    member_flags = training.flag_values(FLAGS, MEMBER_FLAGS)

    def counts_path(index):
        return os.path.join(member_dir, f"member_{index}.counts.json")

    def made_here(index):
        path = counts_path(index)
        return (os.path.exists(kft.members.member_path(member_dir, index))
                and os.path.exists(path)
                and training.read_json(path)["flags"] == member_flags)

    for index in my_members:
        if not made_here(index):
            training.clear_members(member_dir, first=index, only=True)
    if training.is_chief():  # members beyond M of an earlier, larger run
        training.clear_members(member_dir, first=num_members)

    # --- the DST Ensemble ----------------------------------------------------
    seeds = [FLAGS.seed + i for i in range(num_members)]
    print(
        f"[dst] {num_members} sparse runs of {FLAGS.epochs} epochs: "
        f"{FLAGS.model}, sparsity {FLAGS.sparsity} ({FLAGS.distribution}, "
        f"grow={FLAGS.grow}), seeds {seeds}; this process trains members "
        f"{my_members} on {strategy.num_replicas_in_sync} replica(s)"
    )
    timers = {}

    def callbacks(index):
        timers[index] = training.EpochTimer()

        def record_counts(record):
            record["seconds_per_epoch"] = timers[index].median()
            training.write_json(counts_path(index),
                                {"flags": member_flags, "record": record})

        print(f"[dst] member {index} (seed {seeds[index]})")
        return [
            keras.callbacks.LearningRateScheduler(
                training.step_decay(FLAGS.learning_rate, FLAGS.epochs)),
            kft.SparsityMonitor(per_layer=False), timers[index],
            training.UpdateCounter(on_record=record_counts),
        ]

    trained = []
    for index in my_members:
        result = kft.train_dst_ensemble(
            build_model, dataset.train, num_members=num_members,
            seeds=seeds, sparsity=FLAGS.sparsity, member_dir=member_dir,
            member_index=index, epochs=FLAGS.epochs,
            optimizer=inner_optimizer,
            metrics=["accuracy"], validation_data=dataset.validation,
            callbacks=callbacks, verbose=verbose,
            distribution=FLAGS.distribution, grow=FLAGS.grow,
            drop_fraction=FLAGS.drop_fraction,
            update_interval=FLAGS.update_interval, **distribute,
        )
        trained += result["trained"]
    kept = [i for i in my_members if i not in trained]
    if kept:
        print(f"[dst] members {kept} were already trained with these flags; "
              "kept")
    if not training.is_chief():
        print(f"[dst] members {my_members} done; the chief assembles the "
              "ensemble")
        return
    paths = distributed.wait_for_members(member_dir, num_members)

    # FLOPs: every member has the same per-layer counts, hence the same f_S.
    member = kft.members.load_member(paths[0])
    f_dense = float(kft.flops.dense_forward_flops(member))
    f_sparse = float(kft.flops.forward_flops(member, masks={
        v.path: keras.ops.convert_to_numpy(v) != 0
        for v in member.trainable_weights if len(v.shape) >= 2
    }))
    members, prefix, total = [], [], 0.0
    for index in range(num_members):
        record = training.read_json(counts_path(index))["record"]
        record["train_flops"] = kft.flops.training_flops(
            f_sparse, f_dense, record["steps"], record["update_steps"],
            FLAGS.batch_size,
        )
        members.append(record)
        total += record["train_flops"]
        prefix.append(total)
    seconds = sorted(m["seconds_per_epoch"] for m in members
                     if m.get("seconds_per_epoch"))
    methods = [training.method_record(
        key="dst", label="DST", kind="dst", member_dir=member_dir,
        f_dense=f_dense, f_sparse=f_sparse, batch_size=FLAGS.batch_size,
        epochs=FLAGS.epochs, members=members, prefix_train_flops=prefix,
        seconds_per_epoch=seconds[len(seconds) // 2] if seconds else None,
        sparsity=FLAGS.sparsity, distribution=FLAGS.distribution,
    )]

    if FLAGS.dense_baseline:
        methods.append(training.train_dense(
            build_model, dataset, FLAGS.epochs, FLAGS, strategy,
            os.path.join(output_dir, "dense"), verbose,
        ))

    training.finish_run(
        "train_dst_ensemble.py", "dst", output_dir, FLAGS, RECORDED_FLAGS, dataset,
        strategy, methods, started,
    )


if __name__ == "__main__":
    common.run(main)
