"""Tests of train_dst_ensemble: distinct members, reruns, one member per
process, overrides across members, errors."""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_freetickets as kft
from keras_freetickets import dst
from keras_freetickets import members as members_lib


def build_model():
    return keras.Sequential([
        keras.Input((12,)),
        keras.layers.Dense(32, activation="relu", name="first"),
        keras.layers.Dense(24, activation="relu"),
        keras.layers.Dense(3),
    ])


def toy_data(n=192):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 12)).astype("float32")
    return x, x[:, :3].argmax(1).astype("int64")


def kernels(path):
    weights = members_lib.read_member_weights(path, prunable_only=True)
    return [weights[k] for k in sorted(weights)]


def test_members_are_distinct_exact_and_not_retrained(tmp_path):
    x, y = toy_data()
    result = kft.train_dst_ensemble(
        build_model, (x, y), num_members=3, seeds=[3, 4, 5], sparsity=0.8,
        member_dir=tmp_path, epochs=2, batch_size=32, update_interval=4,
        verbose=0,
    )
    assert result["trained"] == [0, 1, 2]
    assert [os.path.basename(p) for p in result["paths"]] == [
        "member_0.kftm", "member_1.kftm", "member_2.kftm"]
    densities = []
    for index, path in enumerate(result["paths"]):
        meta = members_lib.read_member_metadata(path)
        assert meta["seed"] == [3, 4, 5][index]
        assert meta["ever_active"] > meta["density"]  # masks moved
        densities.append(meta["density"])
    assert densities[0] == pytest.approx(densities[1]) == pytest.approx(0.2,
                                                                      abs=0.01)
    overlap = members_lib.pairwise_mask_overlap(result["paths"])
    assert np.all(overlap[np.triu_indices(3, 1)] < 0.9)
    a, b = kernels(result["paths"][0]), kernels(result["paths"][1])
    assert not np.allclose(a[0], b[0])  # distinct initial weights and masks
    stamp = [os.path.getmtime(p) for p in result["paths"]]
    again = kft.train_dst_ensemble(
        build_model, (x, y), num_members=3, seeds=[3, 4, 5],
        member_dir=tmp_path, epochs=2, batch_size=32, verbose=0,
    )
    assert again["trained"] == []
    assert stamp == [os.path.getmtime(p) for p in result["paths"]]


def test_one_member_per_process_by_argument_or_environment(tmp_path,
                                                            monkeypatch):
    x, y = toy_data(64)
    first = kft.train_dst_ensemble(
        build_model, (x, y), num_members=3, member_dir=tmp_path, epochs=1,
        batch_size=32, member_index=1, verbose=0,
    )
    assert first["trained"] == [1]
    assert dst.missing_members(tmp_path, 3) == [0, 2]
    monkeypatch.setenv(dst.MEMBER_INDEX_ENV, "2")
    second = kft.train_dst_ensemble(
        build_model, (x, y), num_members=3, member_dir=tmp_path, epochs=1,
        batch_size=32, verbose=0,
    )
    assert second["trained"] == [2]
    assert dst.missing_members(tmp_path, 3) == [0]


def test_overrides_hold_for_every_member_and_datasets_work(tmp_path):
    x, y = toy_data()
    train = tf.data.Dataset.from_tensor_slices((x, y)).batch(32)
    result = kft.train_dst_ensemble(
        build_model, train, num_members=2, member_dir=tmp_path, epochs=1,
        sparsity=0.5, overrides={"first": 0.0}, update_interval=2, verbose=0,
    )
    for path in result["paths"]:
        member = members_lib.load_member(path)
        first = member.get_layer("first").kernel.numpy()
        assert np.count_nonzero(first) == first.size  # kept dense
        rest = [w.numpy() for w in member.weights
                if w.name == "kernel" and w.path.split("/")[-2] != "first"]
        assert min(np.count_nonzero(k) / k.size for k in rest) < 0.5


def test_build_model_may_take_the_seed(tmp_path):
    seen = []

    def build(seed):
        seen.append(seed)
        return build_model()

    x, y = toy_data(64)
    kft.train_dst_ensemble(build, (x, y), num_members=2, seeds=[7, 9],
                           member_dir=tmp_path, epochs=1, batch_size=32,
                           verbose=0)
    assert seen == [7, 9]


@pytest.mark.parametrize(
    "kwargs, error",
    [
        (dict(num_members=0), "num_members=0"),
        (dict(seeds=[1, 1, 2]), "seeds=\\[1, 1, 2\\]"),
        (dict(seeds=[1, 2]), "seeds=\\[1, 2\\]"),
        (dict(member_index=3), "member_index=3"),
        (dict(epochs=0), "epochs=0"),
        (dict(sparsity=1.5), "sparsity=1.5"),
        (dict(seed=3), "seed"),
        (dict(build_model=None), "build_model=None"),
        (dict(batch_size=None), "batch_size=None"),
    ],
)
def test_bad_arguments(tmp_path, kwargs, error):
    x, y = toy_data(64)
    args = dict(build_model=build_model, train_data=(x, y), num_members=3,
                member_dir=tmp_path, epochs=1, batch_size=32, verbose=0)
    args.update(kwargs)
    with pytest.raises(ValueError, match=error):
        kft.train_dst_ensemble(**args)


def test_members_build_inside_a_given_strategy(tmp_path):
    strategy = tf.distribute.MirroredStrategy(["/cpu:0"])
    seen = []

    def build():
        seen.append(tf.distribute.get_strategy() is strategy)
        return build_model()

    x, y = toy_data(64)
    result = kft.train_dst_ensemble(build, (x, y), num_members=2,
                                    member_dir=tmp_path, epochs=1,
                                    batch_size=32, strategy=strategy,
                                    verbose=0)
    assert seen == [True, True]
    assert result["trained"] == [0, 1]
