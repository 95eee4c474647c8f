"""Tests for keras_freetickets.export: the SavedModel for TF Serving."""

import json
import os
import pathlib
import subprocess
import sys
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

from keras_freetickets import _export_graph
from keras_freetickets import export as export_lib
from keras_freetickets.ensemble import FreeTicketsEnsemble

SUBPROCESS_TIMEOUT = 120
SERVING_OUTPUTS = set(export_lib.OUTPUT_NAMES)


def _sparsify(model, sparsity, seed):
    """Exactly round(sparsity * size) zeros in every kernel; random biases."""
    rng = np.random.default_rng(seed)
    for variable in model.weights:
        value = keras.ops.convert_to_numpy(variable).copy()
        if variable.path.endswith("kernel"):
            flat = value.reshape(-1)
            flat[rng.permutation(flat.size)[: int(round(sparsity * flat.size))]] = 0.0
        elif variable.path.endswith("bias"):
            value = rng.normal(scale=0.1, size=value.shape).astype("float32")
        variable.assign(value)
    return model


def _mlp(seed, sparsity=0.8):
    """FMNIST-MLP v1's 784-300-100-10 network, random weights, exact sparsity."""
    keras.utils.set_random_seed(seed)
    model = keras.Sequential(
        [
            keras.Input((784,)),
            keras.layers.Dense(300, activation="relu"),
            keras.layers.Dense(100, activation="relu"),
            keras.layers.Dense(10),
        ]
    )
    return _sparsify(model, sparsity, seed)


def _cnn(seed, sparsity=0.8):
    """A small Functional CNN with a residual branch, BN, dropout, a nested
    Sequential block and a final softmax."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((12, 12, 1))
    x = keras.layers.Conv2D(6, 3, padding="same", activation="relu")(inputs)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.MaxPooling2D()(x)
    y = keras.layers.Conv2D(6, 3, padding="same", strides=1)(x)
    x = keras.layers.ReLU()(keras.layers.Add()([x, y]))
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dropout(0.5)(x)
    block = keras.Sequential(
        [keras.Input((216,)), keras.layers.Dense(16, activation="relu")]
    )
    x = block(x)
    outputs = keras.layers.Dense(4, activation="softmax")(x)
    model = _sparsify(keras.Model(inputs, outputs), sparsity, seed)
    rng = np.random.default_rng(seed + 100)
    bn = model.layers[2]
    bn.moving_mean.assign(rng.normal(size=6).astype("float32"))
    bn.moving_variance.assign(rng.uniform(0.5, 2.0, size=6).astype("float32"))
    return model


def _x(n, shape=(784,), seed=0):
    return np.random.default_rng(seed).random((n,) + tuple(shape)).astype("float32")


def _entropy(p):
    return -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0), axis=-1)


def _serve(path, x, signature="serving_default"):
    loaded = tf.saved_model.load(path)
    outputs = loaded.signatures[signature](inputs=tf.constant(x))
    return {k: v.numpy() for k, v in outputs.items()}


@pytest.fixture(scope="module")
def mlp_export(tmp_path_factory):
    """An M = 3 MLP ensemble at S = 0.8, exported; its Keras predictions."""
    members = [_mlp(seed) for seed in range(3)]
    ensemble = FreeTicketsEnsemble(members)
    x = _x(50)
    path = str(tmp_path_factory.mktemp("serving") / "fashion" / "1")
    written = ensemble.export(path)
    result = dict(
        ensemble=ensemble,
        path=path,
        written=written,
        x=x,
        probabilities=ensemble.predict(x, verbose=0),
        members=ensemble.member_predictions(x),
    )
    yield result
    keras.backend.clear_session()


def test_serving_outputs_match_predict_and_uncertainty_formulas(mlp_export):
    x = mlp_export["x"]
    outputs = _serve(mlp_export["path"], x)
    probs = mlp_export["probabilities"]
    per_member = mlp_export["members"]  # (M, N, C)

    assert mlp_export["written"] == os.path.abspath(mlp_export["path"])
    assert set(outputs) == SERVING_OUTPUTS
    assert outputs["probabilities"].dtype == np.float32
    assert outputs["classes"].dtype == np.int64
    assert outputs["probabilities"].shape == (50, 10)
    for key in ("classes", "confidence", "entropy", "mutual_information"):
        assert outputs[key].shape == (50,)
    np.testing.assert_allclose(outputs["probabilities"], probs, atol=1e-5)
    np.testing.assert_array_equal(outputs["classes"], outputs["probabilities"].argmax(-1))
    assert np.mean(outputs["classes"] == probs.argmax(-1)) == 1.0
    np.testing.assert_allclose(outputs["confidence"], probs.max(-1), atol=1e-5)
    entropy = _entropy(probs.astype(np.float64))
    np.testing.assert_allclose(outputs["entropy"], entropy, atol=1e-5)
    mutual_information = entropy - _entropy(per_member.astype(np.float64)).mean(axis=0)
    np.testing.assert_allclose(
        outputs["mutual_information"], np.maximum(mutual_information, 0), atol=1e-5
    )
    assert outputs["mutual_information"].max() > 1e-3  # members do disagree
    assert np.all(outputs["mutual_information"] <= outputs["entropy"] + 1e-6)

    members = _serve(mlp_export["path"], x, signature="members")
    assert set(members) == {export_lib.MEMBERS_OUTPUT}
    stacked = members[export_lib.MEMBERS_OUTPUT]
    assert stacked.shape == (50, 3, 10)  # [batch, M, C]
    np.testing.assert_allclose(stacked, np.moveaxis(per_member, 0, 1), atol=1e-5)


def test_identical_members_have_zero_mutual_information(tmp_path):
    first = _mlp(0)
    second = keras.models.clone_model(first)
    second.set_weights(first.get_weights())
    path = str(tmp_path / "1")
    FreeTicketsEnsemble([first, second]).export(path)

    outputs = _serve(path, _x(20))

    assert outputs["entropy"].min() > 0.1
    np.testing.assert_allclose(outputs["mutual_information"], 0.0, atol=1e-6)


def test_functional_cnn_members_match_predict_with_kernels_sliced(tmp_path, monkeypatch):
    # A tiny slice size forces every kernel to be cut along its output axis,
    # so the per-slice outputs are concatenated (the path of >8 MiB kernels).
    monkeypatch.setattr(_export_graph, "_CHUNK_BYTES", 1024)
    members = [_cnn(seed) for seed in range(2)]
    ensemble = FreeTicketsEnsemble(members, output="probabilities")
    x = _x(16, shape=(12, 12, 1))
    path = str(tmp_path / "cnn" / "3")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # all kernels supported
        ensemble.export(path)

    outputs = _serve(path, x)
    members_out = _serve(path, x, signature="members")[export_lib.MEMBERS_OUTPUT]

    np.testing.assert_allclose(
        outputs["probabilities"], ensemble.predict(x, verbose=0), atol=1e-5
    )
    np.testing.assert_allclose(
        members_out, np.moveaxis(ensemble.member_predictions(x), 0, 1), atol=1e-5
    )


@keras.saving.register_keras_serializable(package="kft_test_export")
class SubclassedNet(keras.Model):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.hidden = keras.layers.Dense(32, activation="relu")
        self.head = keras.layers.Dense(10)

    def call(self, inputs):
        return self.head(self.hidden(inputs))


def test_subclassed_member_is_exported_dense_with_a_warning(tmp_path):
    keras.utils.set_random_seed(0)
    subclassed = SubclassedNet()
    subclassed(_x(2))
    _sparsify(subclassed, 0.9, 0)
    ensemble = FreeTicketsEnsemble([_mlp(1), subclassed])
    x = _x(12)

    with pytest.warns(UserWarning, match=r"member 1 .*stored dense"):
        ensemble.export(str(tmp_path / "1"))

    np.testing.assert_allclose(
        _serve(str(tmp_path / "1"), x)["probabilities"],
        ensemble.predict(x, verbose=0),
        atol=1e-5,
    )


@pytest.mark.parametrize("kernel_mode", ["rebuild_variables", "sparse_matmul"])
def test_alternative_kernel_modes_match_predict(tmp_path, kernel_mode):
    ensemble = FreeTicketsEnsemble([_mlp(0, sparsity=0.9)])
    x = _x(8)
    path = str(tmp_path / "1")
    export_lib.export_ensemble(ensemble, path, kernel_mode=kernel_mode)

    np.testing.assert_allclose(
        _serve(path, x)["probabilities"], ensemble.predict(x, verbose=0), atol=1e-5
    )


@pytest.mark.parametrize("sparsity", [0.8, 0.9])
def test_export_does_not_pay_for_zeros(tmp_path, sparsity):
    # BENCHMARK.md "Storage": bytes over the dense model's, target (1 - S) + 0.1.
    ensemble = FreeTicketsEnsemble([_mlp(0, sparsity=sparsity)])
    compact_path = str(tmp_path / "compact" / "1")
    dense_path = str(tmp_path / "dense" / "1")
    ensemble.export(compact_path)
    ensemble.export(dense_path, compact=False)

    ratio = export_lib.saved_model_bytes(compact_path) / export_lib.saved_model_bytes(
        dense_path
    )

    assert ratio <= (1 - sparsity) + 0.1
    # The nonzero values themselves are stored: not below the density.
    assert ratio >= (1 - sparsity) * 0.95


def test_ensemble_export_stores_shared_constants_once(mlp_export):
    # Both signatures run the same traced member function: M = 3 members at
    # S = 0.8 stay within (1 - S) + 0.1 of the dense-storage export.
    dense_path = os.path.join(os.path.dirname(mlp_export["path"]), "dense", "1")
    mlp_export["ensemble"].export(dense_path, compact=False)

    ratio = export_lib.saved_model_bytes(mlp_export["path"]) / (
        export_lib.saved_model_bytes(dense_path)
    )

    assert ratio <= 0.2 + 0.1


# The child process never imports keras_freetickets, and cannot import Keras:
# its import finder hides them (TensorFlow then runs as without Keras).
_FRESH_PROCESS = r"""
import importlib.machinery, json, sys
HIDDEN = ("keras", "keras_freetickets", "tf_keras")

class Hide(importlib.machinery.PathFinder):
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name.split(".")[0] in HIDDEN:
            return None
        return importlib.machinery.PathFinder.find_spec(name, path, target)

sys.meta_path = [Hide if f is importlib.machinery.PathFinder else f for f in sys.meta_path]
import numpy as np
import tensorflow as tf

export_dir, x_path, out_path = sys.argv[1:4]
loaded = tf.saved_model.load(export_dir)
x = tf.constant(np.load(x_path))
results = {}
for name in ("serving_default", "members"):
    for key, value in loaded.signatures[name](inputs=x).items():
        results[key] = value.numpy()
np.savez(out_path, **results)
imported = sorted(m for m in sys.modules if m.split(".")[0] in HIDDEN)
print(json.dumps({"imported": imported, "signatures": sorted(loaded.signatures)}))
"""


def test_loads_in_a_fresh_process_without_keras(mlp_export, tmp_path):
    x_path = tmp_path / "x.npy"
    np.save(x_path, mlp_export["x"])
    out_path = tmp_path / "out.npz"
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH="")

    done = subprocess.run(
        [sys.executable, "-c", _FRESH_PROCESS, mlp_export["path"], str(x_path), str(out_path)],
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT,
        env=env,
        cwd=str(tmp_path),
    )

    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["imported"] == []
    assert report["signatures"] == ["members", "serving_default"]
    results = np.load(out_path)
    np.testing.assert_allclose(
        results["probabilities"], mlp_export["probabilities"], atol=1e-5
    )
    np.testing.assert_allclose(
        results[export_lib.MEMBERS_OUTPUT],
        np.moveaxis(mlp_export["members"], 0, 1),
        atol=1e-5,
    )


def _saved_model_cli():
    cli = pathlib.Path(sys.executable).parent / "saved_model_cli"
    if not cli.exists():
        pytest.skip(f"saved_model_cli not found beside {sys.executable}")
    return str(cli)


def test_saved_model_cli_show_and_run(mlp_export, tmp_path):
    cli = _saved_model_cli()
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")

    shown = subprocess.run(
        [cli, "show", "--all", "--dir", mlp_export["path"]],
        capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT, env=env,
    )
    assert shown.returncode == 0, shown.stderr[-3000:]
    text = shown.stdout
    assert "signature_def['serving_default']" in text
    assert "signature_def['members']" in text
    assert "inputs['inputs'] tensor_info:" in text
    for key in SERVING_OUTPUTS | {export_lib.MEMBERS_OUTPUT}:
        assert f"outputs['{key}'] tensor_info:" in text
    classes_info = text.split("outputs['classes'] tensor_info:")[1].splitlines()[1]
    assert "DT_INT64" in classes_info
    assert "shape: (-1, 3, 10)" in text  # member_probabilities, [batch, M, C]

    x_path = tmp_path / "x.npy"
    np.save(x_path, mlp_export["x"][:4])
    out_dir = tmp_path / "cli_out"
    ran = subprocess.run(
        [cli, "run", "--dir", mlp_export["path"], "--tag_set", "serve",
         "--signature_def", "serving_default", "--inputs", f"inputs={x_path}",
         "--outdir", str(out_dir)],
        capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT, env=env,
    )
    assert ran.returncode == 0, ran.stderr[-3000:]
    np.testing.assert_allclose(
        np.load(out_dir / "probabilities.npy"), mlp_export["probabilities"][:4], atol=1e-5
    )
    np.testing.assert_array_equal(
        np.load(out_dir / "classes.npy"), mlp_export["probabilities"][:4].argmax(-1)
    )


def test_predict_request_round_trip(mlp_export):
    predict_pb2 = pytest.importorskip(
        "tensorflow_serving.apis.predict_pb2",
        reason="tensorflow-serving-api is not installed "
        "(pip install --no-deps tensorflow-serving-api)",
    )
    x = mlp_export["x"][:7]
    loaded = tf.saved_model.load(mlp_export["path"])

    for signature in ("serving_default", "members"):
        # Client side: the request as a gRPC client would send it.
        request = predict_pb2.PredictRequest()
        request.model_spec.name = "fashion"
        request.model_spec.signature_name = signature
        request.inputs["inputs"].CopyFrom(tf.make_tensor_proto(x))
        wire = request.SerializeToString()

        # Server side: decode the request, run the signature it names, answer.
        received = predict_pb2.PredictRequest.FromString(wire)
        feeds = {k: tf.make_ndarray(v) for k, v in received.inputs.items()}
        assert set(feeds) == {"inputs"} and feeds["inputs"].dtype == np.float32
        outputs = loaded.signatures[received.model_spec.signature_name](
            **{k: tf.constant(v) for k, v in feeds.items()}
        )
        response = predict_pb2.PredictResponse()
        response.model_spec.CopyFrom(received.model_spec)
        for key, value in outputs.items():
            response.outputs[key].CopyFrom(tf.make_tensor_proto(value.numpy()))

        # Client side again.
        answer = predict_pb2.PredictResponse.FromString(response.SerializeToString())
        got = {k: tf.make_ndarray(v) for k, v in answer.outputs.items()}
        if signature == "serving_default":
            assert set(got) == SERVING_OUTPUTS
            assert answer.outputs["classes"].dtype == tf.int64.as_datatype_enum
            np.testing.assert_allclose(
                got["probabilities"], mlp_export["probabilities"][:7], atol=1e-5
            )
            np.testing.assert_array_equal(
                got["classes"], mlp_export["probabilities"][:7].argmax(-1)
            )
        else:
            np.testing.assert_allclose(
                got[export_lib.MEMBERS_OUTPUT],
                np.moveaxis(mlp_export["members"][:, :7], 0, 1),
                atol=1e-5,
            )


_SHAPE_ERROR = r"assertion failed: \[inputs must have shape \[batch, 784\], "


@pytest.mark.parametrize(
    "bad, message",
    [
        (np.zeros((2, 783), "float32"), _SHAPE_ERROR + r"got \[2, 783\]"),
        (np.zeros((2, 3, 784), "float32"), _SHAPE_ERROR + r"got \[2, 3, 784\]"),
        (np.zeros((784,), "float32"), _SHAPE_ERROR + r"got \[784\]"),
        (np.zeros((2, 784), "float64"), r"expected to be a float tensor but is a double tensor"),
        (np.zeros((2, 784), "int32"), r"expected to be a float tensor but is a int32 tensor"),
    ],
    ids=["feature_size", "rank_3", "rank_1", "float64", "int32"],
)
def test_bad_input_gets_a_readable_error_from_the_signature(mlp_export, bad, message):
    serving = tf.saved_model.load(mlp_export["path"]).signatures["serving_default"]

    with pytest.raises(tf.errors.InvalidArgumentError, match=message):
        serving(inputs=tf.constant(bad))


def test_any_batch_size_including_empty(mlp_export):
    serving = tf.saved_model.load(mlp_export["path"]).signatures["serving_default"]

    for n in (0, 1, 33):
        outputs = serving(inputs=tf.constant(_x(n)))
        assert outputs["probabilities"].shape == (n, 10)
        assert outputs["classes"].shape == (n,)


def test_existing_version_is_refused_unless_overwrite(tmp_path):
    first = FreeTicketsEnsemble([_mlp(0)])
    second = FreeTicketsEnsemble([_mlp(1)])
    x = _x(6)
    path = str(tmp_path / "fashion" / "1")
    first.export(path)

    with pytest.raises(FileExistsError, match="overwrite=True"):
        second.export(path)
    np.testing.assert_allclose(
        _serve(path, x)["probabilities"], first.predict(x, verbose=0), atol=1e-5
    )

    second.export(path, overwrite=True)
    np.testing.assert_allclose(
        _serve(path, x)["probabilities"], second.predict(x, verbose=0), atol=1e-5
    )
    assert os.listdir(tmp_path / "fashion") == ["1"]  # no temporary leftovers


def test_failed_write_leaves_no_partial_version(tmp_path, monkeypatch):
    ensemble = FreeTicketsEnsemble([_mlp(0)])
    x = _x(6)
    model_dir = tmp_path / "fashion"
    real_save = tf.saved_model.save

    def save_then_fail(*args, **kwargs):
        real_save(*args, **kwargs)  # files are written, then the export dies
        raise RuntimeError("disk full")

    monkeypatch.setattr(tf.saved_model, "save", save_then_fail)
    with pytest.raises(RuntimeError, match="disk full"):
        ensemble.export(str(model_dir / "1"))
    assert os.listdir(model_dir) == []

    monkeypatch.setattr(tf.saved_model, "save", real_save)
    ensemble.export(str(model_dir / "2"))
    monkeypatch.setattr(tf.saved_model, "save", save_then_fail)
    other = FreeTicketsEnsemble([_mlp(1)])
    with pytest.raises(RuntimeError, match="disk full"):
        other.export(str(model_dir / "2"), overwrite=True)
    assert os.listdir(model_dir) == ["2"]
    np.testing.assert_allclose(  # the old version is intact
        _serve(str(model_dir / "2"), x)["probabilities"],
        ensemble.predict(x, verbose=0),
        atol=1e-5,
    )


def test_non_integer_version_folder_warns(tmp_path):
    ensemble = FreeTicketsEnsemble([_mlp(0)])

    with pytest.warns(UserWarning, match="not an integer version"):
        ensemble.export(str(tmp_path / "fashion" / "latest"))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        ensemble.export(str(tmp_path / "fashion" / "7"))

    assert (tmp_path / "fashion" / "latest" / "saved_model.pb").is_file()


def test_argument_validation(tmp_path):
    ensemble = FreeTicketsEnsemble([_mlp(0)])

    with pytest.raises(ValueError, match="Argument `ensemble` must be a `FreeTicketsEnsemble`"):
        export_lib.export_ensemble(_mlp(0), str(tmp_path / "1"))
    with pytest.raises(ValueError, match="Argument `overwrite` must be a bool"):
        ensemble.export(str(tmp_path / "1"), overwrite="yes")
    with pytest.raises(ValueError, match="Argument `path` must be a non-empty path"):
        ensemble.export("")
    with pytest.raises(
        ValueError,
        match=r"Argument `kernel_mode` must be one of \['rebuild', 'rebuild_variables', "
        r"'sparse_matmul'\]\. Received: kernel_mode='csr'",
    ):
        export_lib.export_ensemble(ensemble, str(tmp_path / "1"), kernel_mode="csr")
    with pytest.raises(ValueError, match="Argument `kernel_mode` must be one of"):
        ensemble.export(str(tmp_path / "1"), kernel_mode=["rebuild"])
    assert not (tmp_path / "1").exists()


@settings(deadline=None, max_examples=15, derandomize=True)
@given(
    shape=st.sampled_from([(5, 3), (16, 9), (3, 3, 2, 7), (1, 40)]),
    density=st.floats(0.0, 1.0),
    chunk_bytes=st.sampled_from([8, 64, 1 << 20]),
    seed=st.integers(0, 2**16),
)
def test_compact_kernel_rebuilds_bit_for_bit(shape, density, chunk_bytes, seed):
    rng = np.random.default_rng(seed)
    value = rng.normal(size=shape).astype("float32")
    value[rng.random(shape) >= density] = 0.0
    value.reshape(-1)[0] = -0.0  # a nonzero bit pattern, kept as a value
    old = _export_graph._CHUNK_BYTES
    _export_graph._CHUNK_BYTES = chunk_bytes
    try:
        kernel = _export_graph._CompactKernel(value, "rebuild")
    finally:
        _export_graph._CHUNK_BYTES = old

    rebuilt = np.concatenate([s.numpy() for s in kernel.dense_slices()], axis=-1)

    assert rebuilt.view(np.uint32).tolist() == value.view(np.uint32).tolist()
    assert kernel.nonzeros == int(np.count_nonzero(value.view(np.uint32)))
    bound = kernel.nonzeros * 4 + len(kernel.slices) * ((value.size + 7) // 8 + 1)
    assert kernel.compact_bytes <= bound


# ---------------------------------------------------------------------------
# Batched ensembles (`FreeTicketsEnsemble(..., batched=True)`).


def _sequential_cnn(seed, sparsity=0.8):
    """FMNIST-CNN v1's layer sequence at 12x12 inputs, exact sparsity."""
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([
        keras.Input((12, 12, 1)),
        keras.layers.Conv2D(4, 3, padding="same", activation="relu"),
        keras.layers.MaxPooling2D(2),
        keras.layers.Conv2D(8, 3, padding="same", activation="relu"),
        keras.layers.MaxPooling2D(2),
        keras.layers.Flatten(),
        keras.layers.Dense(16, activation="relu"),
        keras.layers.Dense(5),
    ])
    return _sparsify(model, sparsity, seed)


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_batched_export_matches_per_member_predict(tmp_path, kind):
    if kind == "mlp":
        members, x = [_mlp(seed) for seed in range(3)], _x(40)
    else:
        members = [_sequential_cnn(seed) for seed in range(3)]
        x = _x(40, shape=(12, 12, 1))
    reference = FreeTicketsEnsemble(members)
    batched = FreeTicketsEnsemble(members, batched=True)
    runners = [
        export_lib._MemberRunner(m, i, True, "rebuild") for i, m in enumerate(members)
    ]
    assert export_lib._batched_plan(batched, runners, True, "rebuild") is not None
    path = str(tmp_path / kind / "1")
    batched.export(path)

    served = _serve(path, x)
    np.testing.assert_allclose(
        served["probabilities"], reference.predict(x, verbose=0), atol=1e-5
    )
    np.testing.assert_allclose(
        _serve(path, x, "members")[export_lib.MEMBERS_OUTPUT],
        np.moveaxis(reference.member_predictions(x), 0, 1), atol=1e-5,
    )
    # Compact storage still applies: about the per-member export's bytes.
    per_member_path = str(tmp_path / f"{kind}_per_member" / "1")
    reference.export(per_member_path)
    assert export_lib.saved_model_bytes(path) < 1.1 * export_lib.saved_model_bytes(
        per_member_path
    )


def test_batched_export_falls_back_for_large_stacked_kernels(tmp_path, monkeypatch):
    # A stacked kernel above the folding limit runs per member instead.
    monkeypatch.setattr(_export_graph, "_CHUNK_BYTES", 64 * 1024)
    members = [_mlp(seed) for seed in range(2)]
    ensemble = FreeTicketsEnsemble(members, batched=True)
    runners = [
        export_lib._MemberRunner(m, i, True, "rebuild") for i, m in enumerate(members)
    ]
    assert export_lib._batched_plan(ensemble, runners, True, "rebuild") is None
    path = str(tmp_path / "1")
    ensemble.export(path)
    x = _x(8)
    np.testing.assert_allclose(
        _serve(path, x)["probabilities"], ensemble.predict(x, verbose=0), atol=1e-5
    )
