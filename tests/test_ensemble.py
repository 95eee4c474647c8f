"""Tests for keras_freetickets.ensemble: the FreeTicketsEnsemble model."""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_freetickets import members as members_lib
from keras_freetickets.ensemble import FreeTicketsEnsemble


def _member(seed, activation=None, inputs=20, classes=3, name=None, sparsity=0.8):
    """A 20-16-3 MLP with exactly round(sparsity * size) zeros per kernel."""
    keras.utils.set_random_seed(seed)
    model = keras.Sequential(
        [
            keras.Input((inputs,)),
            keras.layers.Dense(16, activation="relu"),
            keras.layers.Dense(classes, activation=activation),
        ],
        name=name,
    )
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        value = keras.ops.convert_to_numpy(layer.kernel).copy()
        flat = value.reshape(-1)
        flat[rng.permutation(flat.size)[: int(round(sparsity * flat.size))]] = 0.0
        layer.kernel.assign(value)
        layer.bias.assign(rng.normal(size=layer.bias.shape).astype("float32"))
    return model


def _x(n=40, features=20, seed=0):
    return np.random.default_rng(seed).normal(size=(n, features)).astype("float32")


def _softmax(z):
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def _kernel_zeros(model):
    return [
        keras.ops.convert_to_numpy(v) == 0 for v in model.weights if v.path.endswith("kernel")
    ]


@keras.saving.register_keras_serializable(package="kft_test_ensemble")
class CountingNet(keras.Model):
    """Subclassed member; counts the Python executions of `call`."""

    def __init__(self, classes=3, **kwargs):
        super().__init__(**kwargs)
        self.classes = classes
        self.hidden = keras.layers.Dense(8, activation="relu")
        self.head = keras.layers.Dense(classes)
        self.python_calls = 0

    def call(self, inputs):
        self.python_calls += 1
        return self.head(self.hidden(inputs))

    def get_config(self):
        return {**super().get_config(), "classes": self.classes}


def test_prediction_is_mean_of_member_softmax():
    members = [_member(seed) for seed in range(3)]
    ensemble = FreeTicketsEnsemble(members)
    x = _x()

    expected = np.mean(
        [_softmax(keras.ops.convert_to_numpy(m(x)).astype(np.float64)) for m in members],
        axis=0,
    )
    probs = ensemble.predict(x, batch_size=16, verbose=0)

    assert probs.shape == (40, 3)
    np.testing.assert_allclose(probs, expected, atol=1e-6)
    np.testing.assert_allclose(probs.sum(axis=-1), 1.0, atol=1e-6)
    assert ensemble.num_members == 3
    assert ensemble.members == members
    assert ensemble.member_output == "logits"


def test_member_predictions_shape_and_values():
    members = [_member(seed) for seed in range(3)]
    ensemble = FreeTicketsEnsemble(members)
    x = _x(n=37)

    per_member = ensemble.member_predictions(x, batch_size=16)

    assert per_member.shape == (3, 37, 3)
    for m, member in enumerate(members):
        np.testing.assert_allclose(
            per_member[m], _softmax(keras.ops.convert_to_numpy(member(x))), atol=1e-6
        )
    np.testing.assert_allclose(
        per_member.mean(axis=0), ensemble.predict(x, verbose=0), atol=1e-6
    )
    # Distinct members really give distinct predictions.
    assert np.abs(per_member[0] - per_member[1]).max() > 1e-3

    dataset = tf.data.Dataset.from_tensor_slices((x, np.zeros(37))).batch(10)
    np.testing.assert_allclose(ensemble.member_predictions(dataset), per_member, atol=1e-6)


def test_members_run_in_one_traced_graph_not_per_batch():
    members = []
    for seed in range(2):
        keras.utils.set_random_seed(seed)
        member = CountingNet()
        member(_x(n=2))
        members.append(member)
    ensemble = FreeTicketsEnsemble(members)
    before = [m.python_calls for m in members]

    ensemble.predict(_x(n=200), batch_size=10, verbose=0)  # 20 batches
    ensemble.member_predictions(_x(n=200), batch_size=10)

    # Each member's Python `call` only runs while tracing (a few times), never
    # once per batch.
    for member, count in zip(members, before):
        assert member.python_calls - count <= 6


def test_probabilities_mode_averages_outputs_without_second_softmax():
    members = [_member(seed, activation="softmax") for seed in range(2)]
    ensemble = FreeTicketsEnsemble(members, output="probabilities")
    x = _x()

    expected = np.mean([keras.ops.convert_to_numpy(m(x)) for m in members], axis=0)

    np.testing.assert_allclose(ensemble.predict(x, verbose=0), expected, atol=1e-6)
    np.testing.assert_allclose(
        ensemble.member_predictions(x)[1], keras.ops.convert_to_numpy(members[1](x)), atol=1e-6
    )


def test_output_kind_is_checked_against_final_activation():
    with pytest.raises(ValueError, match="ends in a softmax"):
        FreeTicketsEnsemble([_member(0, activation="softmax")], output="logits")
    with pytest.raises(ValueError, match="ends in a linear activation"):
        FreeTicketsEnsemble([_member(0), _member(1)], output="probabilities")

    softmax_layer = keras.Sequential(
        [keras.Input((20,)), keras.layers.Dense(3), keras.layers.Softmax()]
    )
    with pytest.raises(ValueError, match="ends in a softmax"):
        FreeTicketsEnsemble([softmax_layer], output="logits")
    with pytest.raises(ValueError, match="Argument `output`"):
        FreeTicketsEnsemble([_member(0)], output="scores")


def test_probabilities_mode_rejects_logits_at_prediction_time():
    keras.utils.set_random_seed(0)
    member = CountingNet()  # subclassed: final activation cannot be read
    member(_x(n=2))
    ensemble = FreeTicketsEnsemble([member], output="probabilities")

    with pytest.raises(ValueError, match="sum to 1"):
        ensemble.member_predictions(_x())


def test_members_of_different_shapes_are_rejected():
    with pytest.raises(ValueError, match=r"member 1 .*input \(None, 21\)"):
        FreeTicketsEnsemble([_member(0), _member(1, inputs=21)])
    with pytest.raises(ValueError, match=r"member 0 .*output \(None, 3\).*output \(None, 4\)"):
        FreeTicketsEnsemble([_member(0), _member(1, classes=4)])


def test_bad_members_argument():
    with pytest.raises(ValueError, match="num_members=0"):
        FreeTicketsEnsemble([])
    member = _member(0)
    with pytest.raises(ValueError, match="distinct"):
        FreeTicketsEnsemble([member, member])
    with pytest.raises(ValueError, match="list of Keras models"):
        FreeTicketsEnsemble(member)
    with pytest.raises(ValueError, match="not built"):
        FreeTicketsEnsemble([keras.Sequential([keras.layers.Dense(3)])])


def test_keras_file_round_trip_keeps_members_apart_and_zeros(tmp_path):
    # Same names for every member: weights must still load into the right one.
    members = [_member(seed, name="member") for seed in range(3)]
    ensemble = FreeTicketsEnsemble(members, name="ens")
    x = _x()
    before = ensemble.member_predictions(x)
    probs_before = ensemble.predict(x, verbose=0)

    ensemble.save(tmp_path / "ensemble.keras")
    loaded = keras.models.load_model(tmp_path / "ensemble.keras")

    assert isinstance(loaded, FreeTicketsEnsemble)
    assert loaded.num_members == 3
    np.testing.assert_array_equal(loaded.member_predictions(x), before)
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), probs_before)
    for original, restored in zip(members, loaded.members):
        for zeros_a, zeros_b in zip(_kernel_zeros(original), _kernel_zeros(restored)):
            np.testing.assert_array_equal(zeros_a, zeros_b)
            assert zeros_b.mean() == pytest.approx(0.8, abs=0.01)


def test_subclassed_members_round_trip_through_keras_file(tmp_path):
    members = []
    for seed in range(2):
        keras.utils.set_random_seed(seed)
        member = CountingNet(classes=4)
        member(_x(n=2))
        members.append(member)
    ensemble = FreeTicketsEnsemble(members)
    x = _x()
    before = ensemble.member_predictions(x)

    ensemble.save(tmp_path / "sub.keras")
    loaded = keras.models.load_model(tmp_path / "sub.keras")

    assert all(isinstance(m, CountingNet) for m in loaded.members)
    np.testing.assert_array_equal(loaded.member_predictions(x), before)


def test_config_round_trip():
    ensemble = FreeTicketsEnsemble(
        [_member(s, activation="softmax") for s in range(2)], output="probabilities"
    )
    config = ensemble.get_config()
    clone = FreeTicketsEnsemble.from_config(config)

    assert clone.num_members == 2
    assert clone.member_output == "probabilities"
    assert clone.get_config()["members"][0]["class_name"] == "Sequential"
    assert clone.compute_output_shape((None, 20)) == (None, 3)


def test_save_members_and_from_directory(tmp_path):
    members = [_member(seed) for seed in range(3)]
    ensemble = FreeTicketsEnsemble(members)
    x = _x()

    paths = ensemble.save_members(tmp_path / "members", metadata={"run": "t"})
    loaded = FreeTicketsEnsemble.from_directory(tmp_path / "members")

    assert [os.path.basename(p) for p in paths] == [
        "member_0.kftm", "member_1.kftm", "member_2.kftm"
    ]
    meta = members_lib.read_member_metadata(paths[2])
    assert meta["member_index"] == 2 and meta["run"] == "t"
    np.testing.assert_array_equal(
        loaded.member_predictions(x), ensemble.member_predictions(x)
    )
    for original, restored in zip(members, loaded.members):
        for zeros_a, zeros_b in zip(_kernel_zeros(original), _kernel_zeros(restored)):
            np.testing.assert_array_equal(zeros_a, zeros_b)
    with pytest.raises(FileExistsError):
        ensemble.save_members(tmp_path / "members")


def test_from_directory_missing_or_empty(tmp_path):
    with pytest.raises(FileNotFoundError, match="absent"):
        FreeTicketsEnsemble.from_directory(tmp_path / "absent")
    with pytest.raises(ValueError, match="No members found in"):
        FreeTicketsEnsemble.from_directory(tmp_path)


# ---------------------------------------------------------------------------
# Batched inference: same probabilities as the per-member path.

BATCHED_ATOL = 1e-5  # float32 rounding of reordered sums (seen: <= 5e-8)


def _sequential_cnn(seed, sparsity=0.8, softmax=False):
    """FMNIST-CNN v1's layer sequence, small: conv, pool, conv, pool,
    flatten, dropout, dense, dense."""
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([
        keras.Input((12, 12, 1)),
        keras.layers.Conv2D(4, 3, padding="same", activation="relu"),
        keras.layers.MaxPooling2D(2),
        keras.layers.Conv2D(6, 3, padding="valid", strides=1),
        keras.layers.ReLU(),
        keras.layers.AveragePooling2D(2),
        keras.layers.Flatten(),
        keras.layers.Dropout(0.5),
        keras.layers.Dense(16, activation="relu"),
        keras.layers.Dense(5, activation="softmax" if softmax else None),
    ])
    rng = np.random.default_rng(seed)
    for variable in model.weights:
        value = keras.ops.convert_to_numpy(variable).copy()
        if variable.path.endswith("kernel"):
            flat = value.reshape(-1)
            flat[rng.permutation(flat.size)[: int(round(sparsity * flat.size))]] = 0.0
        else:
            value = rng.normal(scale=0.1, size=value.shape).astype("float32")
        variable.assign(value)
    return model


@pytest.mark.parametrize("kind", ["mlp", "cnn", "cnn_probabilities"])
def test_batched_matches_per_member(kind):
    if kind == "mlp":
        members = [_member(seed) for seed in range(3)]
        x, output = _x(n=50), "logits"
    else:
        softmax = kind == "cnn_probabilities"
        members = [_sequential_cnn(seed, softmax=softmax) for seed in range(3)]
        x = np.random.default_rng(1).random((50, 12, 12, 1)).astype("float32")
        output = "probabilities" if softmax else "logits"
    per_member = FreeTicketsEnsemble(members, output=output)
    batched = FreeTicketsEnsemble(members, output=output, batched=True)
    assert not per_member.batched
    assert batched.batched
    np.testing.assert_allclose(
        batched.predict(x, batch_size=16, verbose=0),
        per_member.predict(x, batch_size=16, verbose=0), atol=BATCHED_ATOL,
    )
    got = batched.member_predictions(x, batch_size=16)
    assert got.shape == (3, 50, per_member.compute_output_shape((None,))[-1])
    np.testing.assert_allclose(
        got, per_member.member_predictions(x, batch_size=16), atol=BATCHED_ATOL
    )
    # Each member's own output, not a permutation of the members.
    for index, member in enumerate(members):
        own = keras.ops.convert_to_numpy(member(x))
        if output == "logits":
            own = _softmax(own)
        np.testing.assert_allclose(got[index], own, atol=BATCHED_ATOL)


def test_batched_grouped_convolution_matches(monkeypatch):
    from keras_freetickets import _ensemble_batched as ensemble_lib

    members = [_sequential_cnn(seed) for seed in range(3)]
    x = np.random.default_rng(2).random((20, 12, 12, 1)).astype("float32")
    expected = FreeTicketsEnsemble(members).predict(x, verbose=0)
    monkeypatch.setattr(ensemble_lib, "CONV_MODE", "grouped")
    got = FreeTicketsEnsemble(members, batched=True).predict(x, verbose=0)
    np.testing.assert_allclose(got, expected, atol=BATCHED_ATOL)


def test_batched_reads_live_weights():
    members = [_member(seed) for seed in range(2)]
    ensemble = FreeTicketsEnsemble(members, batched=True)
    x = _x(n=8)
    before = ensemble.predict(x, verbose=0)
    kernel = members[1].layers[0].kernel
    kernel.assign(keras.ops.convert_to_numpy(kernel) * 2.0)
    after = ensemble.predict(x, verbose=0)
    assert np.abs(after - before).max() > 1e-3
    np.testing.assert_allclose(
        after, FreeTicketsEnsemble(members).predict(x, verbose=0), atol=BATCHED_ATOL
    )


def test_batched_falls_back_where_layers_differ():
    # BatchNormalization has no batched form; a single member has nothing
    # to batch; different widths cannot be stacked.
    def with_bn(seed):
        keras.utils.set_random_seed(seed)
        return keras.Sequential([
            keras.Input((20,)), keras.layers.Dense(8),
            keras.layers.BatchNormalization(), keras.layers.Dense(3),
        ])

    wide = keras.Sequential([keras.Input((20,)), keras.layers.Dense(9), keras.layers.Dense(3)])
    cases = [
        [with_bn(0), with_bn(1)],
        [_member(0)],
        [_member(0), wide],
    ]
    for members in cases:
        ensemble = FreeTicketsEnsemble(members, batched=True)
        assert not ensemble.batched
        x = _x(n=6)
        np.testing.assert_allclose(
            ensemble.predict(x, verbose=0),
            FreeTicketsEnsemble(members).predict(x, verbose=0), atol=1e-6,
        )


def test_batched_option_checked_and_saved(tmp_path):
    with pytest.raises(ValueError, match="batched.*Received: batched='yes'"):
        FreeTicketsEnsemble([_member(0)], batched="yes")
    members = [_member(seed) for seed in range(2)]
    ensemble = FreeTicketsEnsemble(members, batched=True)
    assert ensemble.get_config()["batched"] is True
    path = str(tmp_path / "ensemble.keras")
    ensemble.save(path)
    loaded = keras.models.load_model(path)
    assert loaded.batched
    x = _x(n=5)
    np.testing.assert_allclose(
        loaded.predict(x, verbose=0), ensemble.predict(x, verbose=0), atol=1e-6
    )
