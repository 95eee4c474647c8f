"""Exports a trained ensemble as one SavedModel for TF Serving, then checks it.

The members (of --run_dir's --method, or of --member_dir) are loaded as a
`kft.FreeTicketsEnsemble` and written by `ensemble.export(path)` to
<output_dir>/<model_name>/<version>: a self-contained SavedModel (no Keras or
keras_freetickets needed to serve it) whose `serving_default` signature
returns `probabilities`, `classes`, `confidence`, `entropy` and
`mutual_information`, and whose `members` signature returns every member's
probabilities. Sparse kernels are stored compact (--compact). The script
then loads the SavedModel with `tf.saved_model.load`, runs it on test
images, checks that it agrees with `ensemble.predict`, prints a few
predictions with their uncertainty, and writes export.json to --output_dir.

Example:

  python examples/export.py --run_dir=runs/edst --output_dir=serving
  # then: tensorflow_model_server --model_name=freetickets \\
  #           --model_base_path=$PWD/serving/freetickets --rest_api_port=8501
"""

import os
import re

from absl import flags

import common

common.define("run_dir", "member_dir", "method", "output_dir", "model_name",
              "version", "overwrite", "compact", "data_dir",
              output_dir="serving")
flags.adopt_module_key_flags(common)
FLAGS = flags.FLAGS

MEMBER_FILE = re.compile(r"^member_\d+\.kftm$")
SHOWN_EXAMPLES = 8
CHECK_EXAMPLES = 256


def _members_of(folder):
    return sorted(n for n in os.listdir(folder) if MEMBER_FILE.match(n)) if (
        os.path.isdir(folder)) else []


def _member_source():
    """(member folder, run.json dict or None), checked without TensorFlow."""
    if bool(FLAGS.run_dir) == bool(FLAGS.member_dir):
        raise common.ExampleError(
            "give exactly one of --run_dir (a training --output_dir) and "
            f"--member_dir (received --run_dir={FLAGS.run_dir!r}, "
            f"--member_dir={FLAGS.member_dir!r})"
        )
    if FLAGS.member_dir:
        if not _members_of(FLAGS.member_dir):
            raise common.ExampleError(
                f"flag --member_dir={FLAGS.member_dir}: no member_<i>.kftm "
                "file there"
            )
        return FLAGS.member_dir, None
    run_path = os.path.join(FLAGS.run_dir, "run.json")
    if not os.path.isfile(run_path):
        raise common.ExampleError(
            f"flag --run_dir={FLAGS.run_dir}: no run.json there (give an "
            "--output_dir of train_edst_ensemble.py or train_dst_ensemble.py)"
        )
    import json

    with open(run_path, encoding="utf-8") as handle:
        run = json.load(handle)
    methods = {m["key"]: m for m in run["methods"]}
    key = FLAGS.method
    if key == "auto":
        key = next((k for k, m in methods.items() if m["kind"] != "dense"),
                   next(iter(methods)))
    if key not in methods:
        raise common.ExampleError(
            f"flag --method={key}: the run in {FLAGS.run_dir} has "
            f"{sorted(methods)}"
        )
    folder = os.path.join(FLAGS.run_dir, methods[key]["member_dir"])
    if not _members_of(folder):
        raise common.ExampleError(f"no member file in {folder}")
    return folder, run


def main(argv):
    common.check_no_arguments(argv)
    # Checked before TensorFlow loads.
    member_dir, run = _member_source()
    if not FLAGS.model_name or "/" in FLAGS.model_name or (
        FLAGS.model_name in (".", "..")
    ):
        raise common.ExampleError(
            f"flag --model_name={FLAGS.model_name!r}: give a plain folder name"
        )
    output_dir = common.check_output_dir(FLAGS.output_dir)
    path = os.path.join(output_dir, FLAGS.model_name, str(FLAGS.version))
    if os.path.exists(path) and not FLAGS.overwrite:
        raise common.ExampleError(
            f"{path} exists; pass --overwrite or another --version"
        )

    import numpy as np
    import tensorflow as tf

    import data
    import training
    import keras_freetickets as kft
    from keras_freetickets import export as export_lib

    ensemble = kft.FreeTicketsEnsemble.from_directory(member_dir)
    input_shape = tuple(ensemble.members[0].input_shape[1:])
    print(f"[export] {ensemble.num_members} members from {member_dir}, "
          f"input {input_shape}")
    written = ensemble.export(path, overwrite=FLAGS.overwrite,
                              compact=FLAGS.compact)
    export_bytes = export_lib.saved_model_bytes(written)
    dense_bytes = sum(
        int(np.prod(w.shape)) * np.dtype(w.dtype).itemsize
        for member in ensemble.members for w in member.weights
    )
    print(f"[export] wrote {written}: {export_bytes / 1e6:.2f} MB "
          f"({export_bytes / dense_bytes:.3f} of the members' dense float "
          "weights)")

    # --- check the SavedModel against the Keras ensemble --------------------
    labels = None
    if run is not None:
        x, labels, _ = data.load_test_arrays(
            run["data"]["dataset"], FLAGS.data_dir, CHECK_EXAMPLES,
            log=lambda message: None,
        )
    else:
        x = np.random.default_rng(0).uniform(
            size=(CHECK_EXAMPLES,) + input_shape).astype(np.float32)
    loaded = tf.saved_model.load(written)
    outputs = loaded.signatures["serving_default"](inputs=tf.constant(x))
    outputs = {k: v.numpy() for k, v in outputs.items()}
    member_out = loaded.signatures["members"](inputs=tf.constant(x))
    member_probs = member_out["member_probabilities"].numpy()
    keras_probs = ensemble.predict(x, batch_size=CHECK_EXAMPLES, verbose=0)
    keras_members = ensemble.member_predictions(x, batch_size=CHECK_EXAMPLES)
    max_diff = float(np.max(np.abs(outputs["probabilities"] - keras_probs)))
    max_member_diff = float(np.max(np.abs(
        member_probs - np.moveaxis(keras_members, 0, 1))))
    agree = float(np.mean(outputs["classes"] == keras_probs.argmax(-1)))
    print(f"[export] SavedModel vs ensemble.predict on {len(x)} "
          f"{'test' if labels is not None else 'random'} inputs: max "
          f"|difference| {max_diff:.2e} (members {max_member_diff:.2e}), "
          f"same class on {agree:.1%}")

    rows = {}
    for i in range(min(SHOWN_EXAMPLES, len(x))):
        row = {}
        if labels is not None:
            row["label"] = int(labels[i])
        row.update(
            predicted=int(outputs["classes"][i]),
            confidence=float(outputs["confidence"][i]),
            entropy=float(outputs["entropy"][i]),
            mutual_information=float(outputs["mutual_information"][i]),
        )
        rows[f"example {i}"] = row
    print(kft.metrics.format_table(rows))
    accuracy = (float(np.mean(outputs["classes"] == labels))
                if labels is not None else None)
    summary = {
        "path": written,
        "member_dir": os.path.abspath(member_dir),
        "num_members": ensemble.num_members,
        "input_shape": list(input_shape),
        "compact": FLAGS.compact,
        "bytes": export_bytes,
        "dense_weight_bytes": dense_bytes,
        "bytes_ratio": export_bytes / dense_bytes,
        "signatures": sorted(loaded.signatures.keys()),
        "outputs": sorted(outputs),
        "check_examples": int(len(x)),
        "max_abs_difference": max_diff,
        "max_abs_member_difference": max_member_diff,
        "class_agreement": agree,
        "accuracy": accuracy,
    }
    training.write_json(os.path.join(output_dir, "export.json"), summary)
    print(f"[export] summary written to {os.path.join(output_dir, 'export.json')}")


if __name__ == "__main__":
    common.run(main)
