"""Scores trained ensembles side by side: metrics table, results.json, plots.

Every method of every run in --run_dirs (the --output_dir of
train_edst_ensemble.py or train_dst_ensemble.py runs on the same data set)
is loaded with `kft.FreeTicketsEnsemble.from_directory` and scored on the
test set and the out-of-distribution sets of BENCHMARK.md (scikit-learn
digits, Gaussian noise): accuracy, NLL, ECE (15 bins), OOD AUROC with the
max-probability score, member disagreement, density, training FLOPs relative
to the single dense run (RigL's accounting) and seconds per epoch, for each
ensemble and each of its members. The table is printed; results.json and the
plots (reliability diagram, OOD score histograms, per-layer ERK densities,
mask overlap between members, accuracy and NLL against training FLOPs) are
written to --output_dir.

Example: an EDST run and a DST run compared in one table and one FLOPs plot

  python examples/evaluate.py --run_dirs=runs/edst,runs/dst \\
      --output_dir=runs/compare
"""

import os

from absl import flags

import common

common.define("run_dirs", "output_dir", "data_dir", "eval_examples",
              "batch_size", "plots", output_dir=None)
flags.adopt_module_key_flags(common)
FLAGS = flags.FLAGS


def main(argv):
    common.check_no_arguments(argv)
    # Checked before TensorFlow loads: the runs exist, the output is writable.
    if not FLAGS.run_dirs:
        raise common.ExampleError(
            "flag --run_dirs: give the --output_dir of at least one training "
            "run (comma-separated for several)"
        )
    for run_dir in FLAGS.run_dirs:
        if not os.path.isfile(os.path.join(run_dir, "run.json")):
            raise common.ExampleError(
                f"flag --run_dirs: {run_dir} holds no run.json; give "
                "--output_dir folders of train_edst_ensemble.py or "
                "train_dst_ensemble.py"
            )
    output_dir = common.check_output_dir(FLAGS.output_dir or FLAGS.run_dirs[0])

    import evaluation

    evaluation.evaluate_runs(
        FLAGS.run_dirs, output_dir, data_dir=FLAGS.data_dir,
        eval_examples=FLAGS.eval_examples, batch_size=FLAGS.batch_size,
        plots=FLAGS.plots,
    )


if __name__ == "__main__":
    common.run(main)
