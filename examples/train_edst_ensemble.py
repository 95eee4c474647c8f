"""Trains an EDST ensemble (FreeTickets, Liu et al. 2022) in ONE sparse run.

The network is sparse from its first step (`kft.SparseOptimizer`: ERK
per-layer densities, RigL or SET mask updates). `kft.EDSTCallback` runs
--exploration_epochs of dynamic sparse training, then --num_members
refinement phases of --refinement_epochs each; each phase ends by saving a
member, and the next one starts with a global exploration that replaces
--global_drop_fraction of the active weights. With --dense_baseline a single
dense model of the same architecture is trained for the same number of
epochs. Then (--evaluate) both are scored on the test set and two
out-of-distribution sets, the table is printed, and results.json and the PNG
plots are written to --output_dir.

Example (about 2 minutes on 2 CPU cores, offline):

  python examples/train_edst_ensemble.py --output_dir=runs/edst \\
      --exploration_epochs=4 --refinement_epochs=2 --num_members=3

Output: <output_dir>/edst/member_<i>.kftm, dense/member_0.kftm, run.json,
results.json, reliability.png, ood_histograms.png, layer_density.png,
mask_overlap.png, flops_tradeoff.png.
"""

import time

from absl import flags

import common

common.define(
    *common.DATA_FLAGS, *common.MODEL_FLAGS, *common.SPARSE_FLAGS,
    *common.OPTIMIZER_FLAGS, "num_members", "exploration_epochs",
    "refinement_epochs", "global_drop_fraction", "edst_preset",
    *common.RUN_FLAGS,
    output_dir="runs/edst",
)
flags.adopt_module_key_flags(common)
FLAGS = flags.FLAGS

RECORDED_FLAGS = (
    "dataset", "data_dir", "train_examples", "eval_examples", "batch_size",
    "seed", "model", "l2", "augment", "sparsity", "distribution", "grow",
    "drop_fraction", "update_interval", "learning_rate", "momentum",
    "num_members", "exploration_epochs", "refinement_epochs",
    "global_drop_fraction", "edst_preset", "strategy", "dense_baseline",
)


def _lever_flags():
    """EDSTCallback arguments from the flags; unset ones keep its defaults."""
    levers = {}
    if FLAGS.global_drop_fraction is not None:
        levers["global_drop_fraction"] = FLAGS.global_drop_fraction
    if FLAGS.edst_preset == "official":
        levers["preset"] = "official"
    return levers


def main(argv):
    common.check_no_arguments(argv)
    # Everything a flag alone can get wrong is checked before TensorFlow loads.
    output_dir = common.check_output_dir(FLAGS.output_dir)
    common.check_dataset_name(FLAGS.dataset, FLAGS.data_dir)

    import keras

    import data
    import models
    import training
    import keras_freetickets as kft

    started = time.time()
    verbose = common.verbose_value(FLAGS.verbose)
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

    # --- the EDST run ------------------------------------------------------
    member_dir = training.worker_dir(output_dir, "edst")
    training.clear_members(member_dir)
    edst = kft.EDSTCallback(
        num_members=FLAGS.num_members,
        exploration_epochs=FLAGS.exploration_epochs,
        refinement_epochs=FLAGS.refinement_epochs,
        member_dir=member_dir,
        **_lever_flags(),
    )
    print(
        f"[edst] {FLAGS.model}, sparsity {FLAGS.sparsity} "
        f"({FLAGS.distribution}, grow={FLAGS.grow}), M={FLAGS.num_members}: "
        f"{FLAGS.exploration_epochs} exploration + {FLAGS.num_members} x "
        f"{FLAGS.refinement_epochs} refinement epochs = {edst.total_epochs} "
        f"epochs on {strategy.num_replicas_in_sync} replica(s)"
    )
    keras.utils.set_random_seed(FLAGS.seed)
    with strategy.scope():
        model = training.prepare_model(build_model(), strategy)
        optimizer = training.sparse_optimizer(
            FLAGS, seed=FLAGS.seed, global_exploration=True)
        model.compile(optimizer=optimizer, loss=training.loss(),
                      metrics=["accuracy"])
    timer = training.EpochTimer()
    counter = training.UpdateCounter(epochs=edst.member_epochs())
    history = model.fit(
        dataset.train, epochs=edst.total_epochs,
        validation_data=dataset.validation, shuffle=False,
        # EDSTCallback first: it saves the member that `counter` then counts.
        callbacks=[edst, counter, kft.SparsityMonitor(per_layer=False), timer],
        verbose=verbose,
    )
    kft.sparsity_summary(model)
    f_dense = float(kft.flops.dense_forward_flops(model))
    f_sparse = float(kft.flops.forward_flops(model, masks=optimizer.get_masks()))
    members = []
    for record in counter.records:
        record["train_flops"] = kft.flops.training_flops(
            f_sparse, f_dense, record["steps"], record["update_steps"],
            FLAGS.batch_size,
        )
        members.append(record)
    methods = [training.method_record(
        key="edst", label="EDST", kind="edst", member_dir=member_dir,
        f_dense=f_dense, f_sparse=f_sparse, batch_size=FLAGS.batch_size,
        epochs=edst.total_epochs, members=members,
        # The ensemble of the first k members exists once member k is saved.
        prefix_train_flops=[m["train_flops"] for m in members],
        seconds_per_epoch=timer.median(), history=history.history,
        sparsity=FLAGS.sparsity, distribution=FLAGS.distribution,
    )]

    # --- the dense baseline, same number of epochs ---------------------------
    if FLAGS.dense_baseline:
        methods.append(training.train_dense(
            build_model, dataset, edst.total_epochs, FLAGS, strategy,
            training.worker_dir(output_dir, "dense"), verbose,
        ))
    if not training.is_chief():
        print("[edst] done; the chief writes run.json and the results")
        return

    training.finish_run(
        "train_edst_ensemble.py", "edst", output_dir, FLAGS, RECORDED_FLAGS, dataset,
        strategy, methods, started,
    )


if __name__ == "__main__":
    common.run(main)
