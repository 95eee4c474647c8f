"""Tests for keras_freetickets.members: compact member files."""

import json
import os
import zipfile

import keras
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keras_freetickets import members as members_lib


def _sparsify(model, sparsity, seed):
    """Zeros exactly round(sparsity * size) entries of every kernel, at random."""
    rng = np.random.default_rng(seed)
    for variable in model.weights:
        if variable.path.split("/")[-1] == "kernel":
            value = keras.ops.convert_to_numpy(variable).copy()
            flat = value.reshape(-1)
            count = int(round(sparsity * flat.size))
            flat[rng.permutation(flat.size)[:count]] = 0.0
            variable.assign(value)
    return model


def _small_model(seed=0, sparsity=0.8, name=None):
    keras.utils.set_random_seed(seed)
    model = keras.Sequential(
        [
            keras.Input((20,)),
            keras.layers.Dense(16, activation="relu"),
            keras.layers.Dense(3),
        ],
        name=name,
    )
    return _sparsify(model, sparsity, seed)


def _mlp(sparsity, seed=0):
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


def _bits(variable_or_array):
    array = np.ascontiguousarray(keras.ops.convert_to_numpy(variable_or_array))
    return array.view(np.uint8)


def _assert_same_weights(model_a, model_b):
    assert len(model_a.weights) == len(model_b.weights)
    for a, b in zip(model_a.weights, model_b.weights):
        assert tuple(a.shape) == tuple(b.shape)
        np.testing.assert_array_equal(_bits(a), _bits(b))


@keras.saving.register_keras_serializable(package="kft_test_members")
class TwoLayerNet(keras.Model):
    def __init__(self, units=8, classes=3, **kwargs):
        super().__init__(**kwargs)
        self.units = units
        self.classes = classes
        self.hidden = keras.layers.Dense(units, activation="relu")
        self.head = keras.layers.Dense(classes)

    def call(self, inputs):
        return self.head(self.hidden(inputs))

    def get_config(self):
        return {**super().get_config(), "units": self.units, "classes": self.classes}


def test_round_trip_restores_weights_bit_for_bit_and_metadata(tmp_path):
    model = _small_model(seed=1)
    # Entries whose bits are not all zero but that compare equal to 0 or are
    # not numbers: they must come back as they were.
    bias = keras.ops.convert_to_numpy(model.layers[0].bias).copy()
    bias[0], bias[1], bias[2] = -0.0, np.nan, 1.5
    model.layers[0].bias.assign(bias)
    metadata = {"seed": 1, "member_index": 0, "phase": "refine_0",
                "metrics": {"val_loss": np.float32(0.25), "hist": np.arange(3)}}
    path = members_lib.save_member(model, tmp_path / "member_0.kftm", metadata=metadata)

    assert path == str(tmp_path / "member_0.kftm")
    restored = members_lib.load_member(path)
    _assert_same_weights(model, restored)
    x = np.random.default_rng(0).normal(size=(5, 20)).astype("float32")
    np.testing.assert_array_equal(model.predict(x, verbose=0), restored.predict(x, verbose=0))
    for a, b in zip(model.weights, restored.weights):
        assert np.count_nonzero(keras.ops.convert_to_numpy(a)) == np.count_nonzero(
            keras.ops.convert_to_numpy(b)
        )
    read = members_lib.read_member_metadata(path)
    assert read["phase"] == "refine_0"
    assert read["metrics"]["val_loss"] == pytest.approx(0.25)
    assert read["metrics"]["hist"] == [0, 1, 2]


def test_functional_model_with_non_trainable_weights_round_trips(tmp_path):
    keras.utils.set_random_seed(3)
    inputs = keras.Input((20,))
    h = keras.layers.Dense(16)(inputs)
    h = keras.layers.BatchNormalization()(h)
    outputs = keras.layers.Dense(3)(keras.layers.ReLU()(h))
    model = _sparsify(keras.Model(inputs, outputs), 0.7, seed=3)
    bn = model.layers[2]
    bn.moving_mean.assign(np.linspace(-1, 1, 16).astype("float32"))
    bn.moving_variance.assign(np.linspace(0.5, 2, 16).astype("float32"))

    path = members_lib.save_member(model, tmp_path / "m.kftm")
    restored = members_lib.load_member(path)

    _assert_same_weights(model, restored)
    x = np.random.default_rng(1).normal(size=(4, 20)).astype("float32")
    np.testing.assert_array_equal(model.predict(x, verbose=0), restored.predict(x, verbose=0))


def test_registered_subclassed_model_round_trips(tmp_path):
    keras.utils.set_random_seed(4)
    model = TwoLayerNet(units=8)
    x = np.random.default_rng(2).normal(size=(6, 20)).astype("float32")
    model(x)
    _sparsify(model, 0.5, seed=4)

    path = members_lib.save_member(model, tmp_path / "sub.kftm")
    restored = members_lib.load_member(path)

    assert isinstance(restored, TwoLayerNet)
    _assert_same_weights(model, restored)
    np.testing.assert_array_equal(model.predict(x, verbose=0), restored.predict(x, verbose=0))


@pytest.mark.parametrize("sparsity", [0.8, 0.9])
def test_file_is_compact(tmp_path, sparsity):
    model = _mlp(sparsity)
    dense_bytes = sum(int(np.prod(v.shape)) * 4 for v in model.weights)

    path = members_lib.save_member(model, tmp_path / "mlp.kftm")
    ratio = os.path.getsize(path) / dense_bytes

    assert ratio <= (1 - sparsity) + 0.1
    if sparsity == 0.8:
        assert ratio < 0.3
    # The exact count of zeros comes back.
    restored = members_lib.load_member(path)
    for a, b in zip(model.weights, restored.weights):
        np.testing.assert_array_equal(
            keras.ops.convert_to_numpy(a) == 0, keras.ops.convert_to_numpy(b) == 0
        )


def test_sparse_weights_use_bitmap_and_dense_weights_stay_dense(tmp_path):
    keras.utils.set_random_seed(5)
    model = keras.Sequential(
        [keras.Input((20,)), keras.layers.Dense(16), keras.layers.Dense(3)]
    )
    # First kernel sparse, second kernel dense (no zeros), biases all zero.
    _sparsify(keras.Sequential([model.layers[0]]), 0.8, seed=5)
    path = members_lib.save_member(model, tmp_path / "m.kftm")

    with zipfile.ZipFile(path) as zf:
        manifest = json.loads(zf.read("kftm.json"))
    encodings = {w["path"].split("/", 1)[-1]: w["encoding"] for w in manifest["weights"]}
    assert encodings["dense/kernel"] == "bitmap"
    assert encodings["dense/bias"] == "bitmap"
    assert encodings["dense_1/kernel"] == "dense"
    assert manifest["format_version"] == members_lib.FORMAT_VERSION
    assert [w["prunable"] for w in manifest["weights"]] == [True, False, True, False]
    _assert_same_weights(model, members_lib.load_member(path))


def test_existing_file_is_not_overwritten_unless_asked(tmp_path):
    path = tmp_path / "member_0.kftm"
    members_lib.save_member(_small_model(seed=0), path, metadata={"seed": 0})

    with pytest.raises(FileExistsError, match=str(path)):
        members_lib.save_member(_small_model(seed=1), path, metadata={"seed": 1})
    assert members_lib.read_member_metadata(path)["seed"] == 0

    replacement = _small_model(seed=1)
    members_lib.save_member(replacement, path, metadata={"seed": 1}, overwrite=True)
    assert members_lib.read_member_metadata(path)["seed"] == 1
    _assert_same_weights(replacement, members_lib.load_member(path))


def test_failed_write_leaves_no_file_and_no_temporary(tmp_path, monkeypatch):
    model = _small_model()
    path = tmp_path / "member_0.kftm"
    original = zipfile.ZipFile.writestr
    calls = []

    def failing_writestr(self, *args, **kwargs):
        calls.append(args[0])
        if len(calls) == 4:  # after the manifest, config and metadata
            raise OSError("disk full")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(zipfile.ZipFile, "writestr", failing_writestr)
    with pytest.raises(OSError, match="disk full"):
        members_lib.save_member(model, path)

    assert len(calls) == 4
    assert not path.exists()
    assert os.listdir(tmp_path) == []


def test_failed_overwrite_keeps_the_old_file(tmp_path, monkeypatch):
    old = _small_model(seed=0)
    path = members_lib.save_member(old, tmp_path / "member_0.kftm")

    def failing_writestr(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(zipfile.ZipFile, "writestr", failing_writestr)
    with pytest.raises(OSError):
        members_lib.save_member(_small_model(seed=1), path, overwrite=True)
    monkeypatch.undo()

    assert os.listdir(tmp_path) == ["member_0.kftm"]
    _assert_same_weights(old, members_lib.load_member(path))


def _rewrite_manifest(path, change):
    with zipfile.ZipFile(path) as zf:
        entries = {name: zf.read(name) for name in zf.namelist()}
    manifest = json.loads(entries["kftm.json"])
    change(manifest)
    entries["kftm.json"] = json.dumps(manifest).encode()
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in entries.items():
            zf.writestr(name, data)


def test_corrupt_or_unknown_files_raise_value_error_naming_the_path(tmp_path):
    good = members_lib.save_member(_small_model(), tmp_path / "good.kftm")
    data = open(good, "rb").read()

    garbage = tmp_path / "garbage.kftm"
    garbage.write_bytes(b"not a member file at all")
    truncated = tmp_path / "truncated.kftm"
    truncated.write_bytes(data[: len(data) // 2])
    for path in (garbage, truncated):
        with pytest.raises(ValueError, match=str(path)):
            members_lib.load_member(path)
        with pytest.raises(ValueError, match=str(path)):
            members_lib.read_member_metadata(path)

    future = tmp_path / "future.kftm"
    future.write_bytes(data)
    _rewrite_manifest(future, lambda m: m.update(format_version=99))
    with pytest.raises(ValueError, match="format version 99"):
        members_lib.load_member(future)

    broken_weight = tmp_path / "broken_weight.kftm"
    broken_weight.write_bytes(data)
    _rewrite_manifest(broken_weight, lambda m: m["weights"][0].update(shape=[21, 16]))
    with pytest.raises(ValueError, match="broken_weight.kftm"):
        members_lib.load_member(broken_weight)

    not_member = tmp_path / "other.zip"
    with zipfile.ZipFile(not_member, "w") as zf:
        zf.writestr("hello.txt", "hi")
    with pytest.raises(ValueError, match="other.zip"):
        members_lib.load_member(not_member)

    with pytest.raises(FileNotFoundError, match="missing.kftm"):
        members_lib.load_member(tmp_path / "missing.kftm")


def test_bad_arguments_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="metadata"):
        members_lib.save_member(_small_model(), tmp_path / "a.kftm", metadata={"x": object()})
    with pytest.raises(ValueError, match="must be built"):
        members_lib.save_member(
            keras.Sequential([keras.layers.Dense(3)]), tmp_path / "b.kftm"
        )
    with pytest.raises(ValueError, match="keras.Model"):
        members_lib.save_member(keras.layers.Dense(3), tmp_path / "c.kftm")
    assert os.listdir(tmp_path) == []
    with pytest.raises(ValueError, match="index"):
        members_lib.member_path(tmp_path, -1)


def test_list_members_sorts_by_index_and_ignores_other_files(tmp_path):
    model = _small_model()
    for index in (10, 2, 0):
        members_lib.save_member(model, members_lib.member_path(tmp_path, index))
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / ".member_3.kftm.abc.tmp").write_text("x")
    (tmp_path / "member_x.kftm").write_text("x")

    paths = members_lib.list_members(tmp_path, allow_gaps=True)

    assert [os.path.basename(p) for p in paths] == [
        "member_0.kftm", "member_2.kftm", "member_10.kftm"
    ]
    assert paths[1] == members_lib.member_path(tmp_path, 2)


def test_list_members_missing_or_empty_directory(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="nope"):
        members_lib.list_members(missing)
    with pytest.raises(ValueError, match="No members found in"):
        members_lib.list_members(tmp_path)


def _set_overlap(mask_a, mask_b):
    a = set(np.flatnonzero(mask_a).tolist())
    b = set(np.flatnonzero(mask_b).tolist())
    return len(a & b) / len(a)


@settings(deadline=None, max_examples=20, derandomize=True)
@given(
    active=st.integers(min_value=1, max_value=60),
    seed=st.integers(min_value=0, max_value=2**16),
)
def test_mask_overlap_matches_set_computation(active, seed):
    rng = np.random.default_rng(seed)
    shapes = [(8, 5), (5, 4)]
    sizes = [int(np.prod(s)) for s in shapes]
    masks = []
    for _ in range(2):
        flat = np.zeros(sum(sizes), bool)
        flat[rng.permutation(flat.size)[:active]] = True
        masks.append(flat)
    values = [m * rng.uniform(0.5, 1.0, m.size) for m in masks]

    def as_weights(v):
        first, second = v[: sizes[0]].reshape(shapes[0]), v[sizes[0]:].reshape(shapes[1])
        return {"d/kernel": first, "d/bias": np.ones(5), "e/kernel": second}

    overlap = members_lib.mask_overlap(as_weights(values[0]), as_weights(values[1]))
    assert overlap == pytest.approx(_set_overlap(masks[0], masks[1]))
    assert members_lib.mask_overlap(as_weights(values[0]), as_weights(values[0])) == 1.0


def test_mask_overlap_of_models_files_and_pairwise(tmp_path):
    models = [_small_model(seed=s, sparsity=0.8) for s in range(3)]
    paths = [
        members_lib.save_member(m, members_lib.member_path(tmp_path, i))
        for i, m in enumerate(models)
    ]

    def kernels_mask(model):
        return np.concatenate(
            [keras.ops.convert_to_numpy(l.kernel).reshape(-1) != 0 for l in model.layers]
        )

    expected = _set_overlap(kernels_mask(models[0]), kernels_mask(models[1]))
    assert members_lib.mask_overlap(models[0], models[1]) == pytest.approx(expected)
    assert members_lib.mask_overlap(paths[0], models[1]) == pytest.approx(expected)
    assert expected < 0.9

    matrix = members_lib.pairwise_mask_overlap(paths)
    assert matrix.shape == (3, 3)
    np.testing.assert_allclose(np.diag(matrix), 1.0)
    # Exact equal counts per layer make the overlap symmetric.
    np.testing.assert_allclose(matrix, matrix.T)
    assert matrix[0, 1] == pytest.approx(expected)

    weights = members_lib.read_member_weights(paths[0], prunable_only=True)
    assert len(weights) == 2
    assert all(key.endswith("kernel") for key in weights)

    with pytest.raises(ValueError, match="same shapes"):
        members_lib.mask_overlap(models[0], _mlp(0.8))


def test_a_live_writers_temporary_file_is_left_alone(tmp_path):
    """Two workers may save the same member at once: a save removes the
    temporaries of dead writers only (it used to remove the other worker's
    file mid-write, which failed that worker's rename)."""
    import socket
    import subprocess

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    host = socket.gethostname().replace(".", "_")
    live = subprocess.Popen(["sleep", "30"])
    dead = subprocess.Popen(["true"])
    dead.wait()
    try:
        live_tmp = tmp_path / f".member_0.kftm.{host}.{live.pid}.aa.tmp"
        dead_tmp = tmp_path / f".member_0.kftm.{host}.{dead.pid}.bb.tmp"
        for path in (live_tmp, dead_tmp):
            path.write_text("partial")
        members_lib.save_member(model, members_lib.member_path(tmp_path, 0))
        assert live_tmp.exists() and not dead_tmp.exists()
    finally:
        live.kill()
