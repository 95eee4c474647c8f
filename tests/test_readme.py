"""The README's Python examples run as written.

Every ```python block of README.md is either run here, in a fresh process
with a small stand-in for the names the README leaves to the reader (`model`,
`train_ds`, `x`, `test_x`, `build_model`, ...), or listed in `NOT_RUN` with
the reason. A new block that is neither fails the test, so an example cannot
go stale unnoticed.
"""

import pathlib
import subprocess
import sys
import textwrap

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"

# The names the README's snippets take as given: Fashion-MNIST-shaped
# random data, two batches an epoch, and a small model (softmax head, or
# logits with HEAD = None).
PRELUDE = textwrap.dedent('''
    HEAD = "softmax"
''')
STAND_INS = textwrap.dedent('''
    import numpy as np
    import keras
    import tensorflow as tf
    import keras_freetickets as kft

    rng = np.random.default_rng(0)
    x = rng.random((64, 784), dtype=np.float32)
    y = rng.integers(0, 10, 64)
    test_x, test_y = x[:32], y[:32]
    train_ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(32)
    val_ds = train_ds.take(1)

    def build_model():
        return keras.Sequential([keras.Input((784,)),
                                 keras.layers.Dense(32, activation="relu"),
                                 keras.layers.Dense(10, activation=HEAD)])

    keras.utils.set_random_seed(0)
    model = build_model()
''')
PRELUDE += STAND_INS
# A logits model: the ensemble's default `output="logits"` applies the
# softmax whose mean the README describes.
COMPILED = textwrap.dedent('''
    HEAD = None
''') + STAND_INS + textwrap.dedent('''
    model.compile(kft.SparseOptimizer(keras.optimizers.SGD(0.05), sparsity=0.8,
                                      seed=0),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
''')

# Small CNN members for the sparse-convolution block.
CNN_MEMBERS = PRELUDE + textwrap.dedent('''
    members = [keras.Sequential([
        keras.Input((12, 12, 1)),
        keras.layers.Conv2D(4, 3, padding="same", activation="relu"),
        keras.layers.MaxPooling2D(2),
        keras.layers.Flatten(),
        keras.layers.Dense(10)]) for _ in range(2)]
''')

# Runs: (a line that identifies the first block, setup, the blocks run after
# it in the same process, identified the same way, and what must hold after).
RUNS = [
    ("kft.SparsityMonitor(log_dir=", PRELUDE, [],
     "assert len(opt.get_masks()) >= 1\nassert os.listdir('logs')"),
    ("kft.EDSTCallback(num_members=3, exploration_epochs=18", COMPILED,
     ["ood = {", "ensemble.export("],
     "assert len(ensemble.members) == 3\n"
     "assert probs.shape == (32, 10) and per_member.shape == (3, 32, 10)\n"
     "assert sorted(os.listdir('dst_members')) and 'ensemble' in summary\n"
     "assert os.path.isfile('serving/fashion/1/saved_model.pb')"),
    ("@kft.register_updater(", PRELUDE, [],
     "assert opt.updater.__class__.__name__ == 'SquaredGradient'"),
    ('conv_kernels="dense")', CNN_MEMBERS, [],
     "names = ensemble.compiled_conv_layers()\n"
     "assert names == ([['conv2d', 'max_pooling2d'], ['conv2d_1', 'max_pooling2d_1']]\n"
     "                 if kft.native.conv_available() else [[], []]), names\n"
     "p = ensemble.predict(np.zeros((3, 12, 12, 1), 'float32'), verbose=0)\n"
     "assert p.shape == (3, 10)"),
    ('kft.BackupAndRestore("run1/backup")', COMPILED, [],
     "assert len(os.listdir('run1/members')) == 3\n"
     "assert not os.path.exists('run1/backup')"),
]
NOT_RUN = {
    "prediction_service_pb2_grpc": "needs a running TF Serving model server; "
    "the export's serving contract is tested in test_export.py",
    'make_strategy("multi_worker")': "needs a cluster; the recipe runs in "
    "test_distributed_multiworker.py (tests/scripts/mwms_worker.py)",
    'make_strategy("tpu"': "needs a TPU",
}


def python_blocks():
    blocks, current = [], None
    for line in README.read_text().splitlines():
        if current is None and line.strip() == "```python":
            current = []
        elif current is not None and line.strip() == "```":
            blocks.append("\n".join(current) + "\n")
            current = None
        elif current is not None:
            current.append(line)
    return blocks


def find(blocks, needle):
    hits = [b for b in blocks if needle in b]
    assert len(hits) == 1, f"{len(hits)} README blocks contain {needle!r}"
    return hits[0]


def test_every_block_is_run_or_excused():
    needles = [r[0] for r in RUNS] + [n for r in RUNS for n in r[2]]
    needles += list(NOT_RUN)
    for block in python_blocks():
        assert any(n in block for n in needles), (
            "A README python block is neither run by tests/test_readme.py nor "
            f"listed in its NOT_RUN:\n{block}"
        )


@pytest.mark.parametrize("first, setup, then, check", RUNS,
                         ids=["quick_start", "edst_ensemble_metrics_export",
                              "custom_updater", "sparse_conv_ensemble",
                              "backup_resume"])
def test_block_runs_as_written(tmp_path, first, setup, then, check):
    blocks = python_blocks()
    script = "import os\n" + setup + find(blocks, first)
    for needle in then:
        script += find(blocks, needle)
    script += check + "\nprint('README-OK')\n"
    (tmp_path / "example.py").write_text(script)
    result = subprocess.run(
        [sys.executable, "example.py"], cwd=tmp_path, capture_output=True,
        text=True, timeout=600,
    )
    assert result.returncode == 0 and "README-OK" in result.stdout, (
        result.stdout[-3000:] + result.stderr[-5000:]
    )
