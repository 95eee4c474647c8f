"""Which weights are pruned; sparse training of every prunable layer type."""

import keras
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import keras_freetickets as kft
from keras_freetickets import distributions
from keras_freetickets import prunable

SETTINGS = dict(deadline=None, max_examples=20, derandomize=True)


@pytest.fixture
def clean_registry(monkeypatch):
    """Lets a test register names without leaking them to other tests."""
    monkeypatch.setattr(prunable, "_PRUNABLE_NAMES",
                        set(prunable._PRUNABLE_NAMES))
    monkeypatch.setattr(prunable, "_EMBEDDING_NAMES",
                        set(prunable._EMBEDDING_NAMES))


def built(layer, input_shape):
    layer.build(input_shape)
    return layer


def prunable_names(layer, include_embeddings=False):
    return sorted(
        v.name for v in prunable.prunable_variables(
            layer.trainable_variables, include_embeddings
        )
    )


# ---------------------------------------------------------------- detection
LAYERS = [
    ("dense", lambda: keras.layers.Dense(4), (None, 6), ["kernel"]),
    ("einsum_dense", lambda: keras.layers.EinsumDense(
        "abc,cd->abd", output_shape=(None, 5), bias_axes="d"),
     (None, 3, 6), ["kernel"]),
    ("conv1d", lambda: keras.layers.Conv1D(4, 3), (None, 10, 2), ["kernel"]),
    ("conv2d", lambda: keras.layers.Conv2D(4, 3), (None, 8, 8, 2),
     ["kernel"]),
    ("conv3d", lambda: keras.layers.Conv3D(4, 2), (None, 4, 4, 4, 2),
     ["kernel"]),
    ("conv1d_transpose", lambda: keras.layers.Conv1DTranspose(4, 3),
     (None, 10, 2), ["kernel"]),
    ("conv2d_transpose", lambda: keras.layers.Conv2DTranspose(4, 3),
     (None, 8, 8, 2), ["kernel"]),
    ("conv3d_transpose", lambda: keras.layers.Conv3DTranspose(4, 2),
     (None, 4, 4, 4, 2), ["kernel"]),
    ("separable_conv1d", lambda: keras.layers.SeparableConv1D(4, 3),
     (None, 10, 2), ["depthwise_kernel", "pointwise_kernel"]),
    ("separable_conv2d", lambda: keras.layers.SeparableConv2D(4, 3),
     (None, 8, 8, 2), ["depthwise_kernel", "pointwise_kernel"]),
    ("depthwise_conv1d", lambda: keras.layers.DepthwiseConv1D(3),
     (None, 10, 2), ["kernel"]),
    ("depthwise_conv2d", lambda: keras.layers.DepthwiseConv2D(3),
     (None, 8, 8, 2), ["kernel"]),
    ("multi_head_attention_dense", lambda: keras.layers.EinsumDense(
        "abc,cde->abde", output_shape=(None, 2, 4), bias_axes="de"),
     (None, 3, 6), ["kernel"]),
    ("embedding", lambda: keras.layers.Embedding(20, 4), (None, 5), []),
    ("batch_norm", lambda: keras.layers.BatchNormalization(),
     (None, 6), []),
    ("layer_norm", lambda: keras.layers.LayerNormalization(), (None, 6), []),
    ("group_norm", lambda: keras.layers.GroupNormalization(2),
     (None, 4, 4), []),
]


@pytest.mark.parametrize("factory, input_shape, expected",
                         [case[1:] for case in LAYERS],
                         ids=[case[0] for case in LAYERS])
def test_prunable_weights_of_builtin_layers(factory, input_shape, expected):
    layer = built(factory(), input_shape)
    assert layer.trainable_variables, "the layer has weights to classify"
    assert prunable_names(layer) == expected
    for variable in layer.trainable_variables:
        if len(variable.shape) < 2:  # biases and normalization: never
            assert not prunable.is_prunable(variable, include_embeddings=True)


def test_embeddings_only_on_request():
    layer = built(keras.layers.Embedding(20, 4), (None, 5))
    assert prunable_names(layer) == []
    assert prunable_names(layer, include_embeddings=True) == ["embeddings"]


def test_non_trainable_kernel_is_not_prunable():
    layer = built(keras.layers.Dense(4), (None, 6))
    layer.trainable = False
    assert not prunable.is_prunable(layer.kernel)


class Bilinear(keras.layers.Layer):
    """A custom layer with a rank-3 weight `w`, a matrix `u` and a bias."""

    def build(self, input_shape):
        d = input_shape[-1]
        self.w = self.add_weight(shape=(d, d, 4), name="w")
        self.u = self.add_weight(shape=(d, 4), name="u")
        self.b = self.add_weight(shape=(4,), name="b", initializer="zeros")

    def call(self, x):
        return (keras.ops.einsum("bi,ijk,bj->bk", x, self.w, x)
                + keras.ops.matmul(x, self.u) + self.b)


def test_mark_prunable_on_a_custom_layer():
    layer = built(Bilinear(), (None, 5))
    assert prunable_names(layer) == []  # unknown names are not pruned
    kft.mark_prunable(layer.w)
    assert prunable_names(layer) == ["w"]
    with pytest.raises(ValueError, match="rank >= 2"):
        kft.mark_prunable(layer.b)
    assert not prunable.is_prunable(layer.b)


def test_mark_not_prunable_opts_a_kernel_out():
    layer = built(keras.layers.Dense(4), (None, 6))
    kft.mark_not_prunable(layer.kernel)
    assert prunable_names(layer) == []
    kft.mark_prunable(layer.kernel)  # and back in
    assert prunable_names(layer) == ["kernel"]


def test_register_prunable_name(clean_registry):
    layer = built(Bilinear(), (None, 5))
    kft.register_prunable_name("u")
    assert prunable_names(layer) == ["u"]
    kft.register_prunable_name("w", embedding=True)
    assert prunable_names(layer) == ["u"]
    assert prunable_names(layer, include_embeddings=True) == ["u", "w"]
    kft.register_prunable_name("b")  # a 1-D weight stays dense anyway
    assert prunable_names(layer, include_embeddings=True) == ["u", "w"]
    for bad in ("", None, 3):
        with pytest.raises(ValueError, match="name"):
            kft.register_prunable_name(bad)


# ------------------------------------------------------------------ matches
@pytest.mark.parametrize("key, path, expected", [
    ("model/dense/kernel", "model/dense/kernel", True),
    ("dense/kernel", "model/dense/kernel", True),
    ("kernel", "model/dense/kernel", True),
    ("dense", "model/dense/kernel", True),
    ("model", "model/dense/kernel", True),
    ("block", "model/block/dense/kernel", True),
    ("ense/kernel", "model/dense/kernel", False),
    ("dense_1", "model/dense/kernel", False),
    ("dense", "model/dense_1/kernel", False),
    ("kernel", "model/dense/dense_kernel", False),
    ("kernel", "model/kernel_layer/bias", False),
    ("model/dense/kernel/x", "model/dense/kernel", False),
])
def test_matches_cases(key, path, expected):
    assert prunable.matches(key, path) is expected


name = st.text("abcdxyz_0", min_size=1, max_size=5)


@settings(**SETTINGS)
@given(parts=st.lists(name, min_size=2, max_size=5), data=st.data())
def test_matches_whole_components_only(parts, data):
    path = "/".join(parts)
    start = data.draw(st.integers(0, len(parts) - 1))
    assert prunable.matches("/".join(parts[start:]), path)
    layer = data.draw(st.sampled_from(parts[:-1]))
    assert prunable.matches(layer, path)
    # A key that is no component and no whole-component suffix never matches.
    stranger = "Q" + parts[-1]  # "Q" is outside the alphabet of `name`
    assert not prunable.matches(stranger, path)
    assert not prunable.matches(stranger + "/" + parts[-1], path)
    # A key saved with a model-name prefix still names the weight of the
    # model rebuilt from a file (whose paths lose that prefix).
    assert prunable.matches("Q/" + path, path)


# --------------------------------------------------------- training models
def loss():
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def train_sparse(model, x, y, steps=6, sparsity=0.8, include_embeddings=False,
                 overrides=None, grow="gradient"):
    opt = kft.SparseOptimizer(
        keras.optimizers.Adam(0.01), sparsity=sparsity, grow=grow,
        update_interval=2, drop_fraction=0.5, overrides=overrides,
        include_embeddings=include_embeddings, seed=1,
    )
    model.compile(optimizer=opt, loss=loss())
    batch = len(x) // steps
    model.fit(x, y, batch_size=batch, epochs=1, shuffle=False, verbose=0)
    assert int(opt.iterations.numpy()) == steps
    return opt


def assert_exact_masks(model, opt, expected_paths, sparsity=0.8,
                       include_embeddings=False):
    masks = opt.get_masks()
    assert sorted(masks) == sorted(expected_paths)
    shapes = {p: tuple(masks[p].shape) for p in masks}
    counts = distributions.resolve_counts(
        shapes, distributions.compute_sparsities(shapes, sparsity, "erk")
    )
    by_path = {v.path: v.numpy() for v in model.trainable_variables}
    for path, mask in masks.items():
        assert int(mask.sum()) == counts[path], path
        assert np.count_nonzero(by_path[path][mask == 0]) == 0, path
    assert opt.check_invariants() == []
    assert int(opt.mask_updates.numpy()) > 0
    assert any(
        layer.ever_active.numpy().sum() > layer.num_active
        for layer in opt.sparse_layers
    )


def test_cnn_with_every_conv_type_keeps_exact_masks():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 3))
    h = keras.layers.Conv2D(8, 3, padding="same", activation="relu")(inputs)
    h = keras.layers.SeparableConv2D(16, 3, padding="same",
                                     activation="relu")(h)
    h = keras.layers.DepthwiseConv2D(3, padding="same", activation="relu")(h)
    h = keras.layers.BatchNormalization()(h)
    h = keras.layers.Conv2DTranspose(8, 3, strides=2, padding="same",
                                     activation="relu")(h)
    h = keras.layers.GlobalAveragePooling2D()(h)
    outputs = keras.layers.Dense(4)(h)
    model = keras.Model(inputs, outputs)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(48, 8, 8, 3)).astype("float32")
    y = rng.integers(0, 4, size=48)
    opt = train_sparse(model, x, y)
    expected = [v.path for v in model.trainable_variables
                if v.name in ("kernel", "depthwise_kernel",
                              "pointwise_kernel")]
    assert len(expected) == 6  # conv, 2 separable, depthwise, transpose, dense
    assert_exact_masks(model, opt, expected)


@pytest.mark.parametrize("include_embeddings", [False, True])
def test_text_model_with_embedding_and_einsum_dense(include_embeddings):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((6,), dtype="int32"),
        keras.layers.Embedding(40, 16),
        keras.layers.EinsumDense("btd,de->bte", output_shape=(None, 24),
                                 bias_axes="e", activation="relu"),
        keras.layers.GlobalAveragePooling1D(),
        keras.layers.Dense(3),
    ])
    rng = np.random.default_rng(1)
    x = rng.integers(0, 40, size=(48, 6)).astype("int32")
    y = (x[:, 0] % 3).astype("int64")
    opt = train_sparse(model, x, y, include_embeddings=include_embeddings)
    names = ("kernel", "embeddings") if include_embeddings else ("kernel",)
    expected = [v.path for v in model.trainable_variables if v.name in names]
    assert len(expected) == (3 if include_embeddings else 2)
    assert_exact_masks(model, opt, expected)
    embeddings = model.layers[0].embeddings.numpy()
    if not include_embeddings:  # left alone: dense
        assert np.count_nonzero(embeddings) == embeddings.size


def test_custom_layer_marked_prunable_is_trained_sparse():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((5,))
    bilinear = Bilinear()
    hidden = bilinear(inputs)
    kft.mark_prunable(bilinear.w)
    model = keras.Model(inputs, keras.layers.Dense(3)(hidden))
    rng = np.random.default_rng(2)
    x = rng.normal(size=(36, 5)).astype("float32")
    y = x[:, :3].argmax(1)
    opt = train_sparse(model, x, y, sparsity=0.7)
    assert_exact_masks(
        model, opt, [bilinear.w.path, model.layers[-1].kernel.path],
        sparsity=0.7,
    )
    assert np.count_nonzero(bilinear.u.numpy()) == bilinear.u.numpy().size


class TwoTower(keras.Model):
    def __init__(self):
        super().__init__()
        self.left = keras.layers.Dense(16, activation="relu")
        self.right = keras.layers.Dense(16, activation="tanh")
        self.head = keras.layers.Dense(3)

    def call(self, x):
        return self.head(keras.ops.concatenate([self.left(x), self.right(x)],
                                               axis=-1))


def test_subclassed_model():
    keras.utils.set_random_seed(0)
    model = TwoTower()
    rng = np.random.default_rng(3)
    x = rng.normal(size=(48, 10)).astype("float32")
    y = x[:, :3].argmax(1)
    model(x[:1])
    opt = train_sparse(model, x, y)
    assert_exact_masks(model, opt, [model.left.kernel.path,
                                    model.right.kernel.path,
                                    model.head.kernel.path])


def nested_model():
    keras.utils.set_random_seed(0)
    inner = keras.Sequential([
        keras.layers.Dense(8, activation="relu", name="inner_a"),
        keras.layers.Dense(64, activation="relu", name="inner_b"),
    ], name="block")
    inputs = keras.Input((12,))
    outputs = keras.layers.Dense(3, name="head")(inner(inputs))
    return keras.Model(inputs, outputs, name="outer"), inner


def nested_data():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(48, 12)).astype("float32")
    return x, x[:, :3].argmax(1)


def test_functional_model_with_nested_sequential():
    model, inner = nested_model()
    opt = train_sparse(model, *nested_data())
    paths = [inner.layers[0].kernel.path, inner.layers[1].kernel.path,
             model.get_layer("head").kernel.path]
    assert any("block" in p for p in paths)
    assert_exact_masks(model, opt, paths)


@pytest.mark.parametrize("key", ["inner_a", "block/inner_a/kernel",
                                 "inner_a/kernel"])
def test_override_by_layer_name_keeps_that_layer_dense(key):
    model, inner = nested_model()
    opt = train_sparse(model, *nested_data(), sparsity=0.7,
                       overrides={key: 0.0})
    masks = opt.get_masks()
    dense_path = inner.layers[0].kernel.path
    assert masks[dense_path].min() == 1
    assert np.count_nonzero(inner.layers[0].kernel.numpy()) == (
        masks[dense_path].size
    )
    assert dense_path not in {layer.path for layer in opt.sparse_layers}
    # The other layers compensate: the global density is still ~30%.
    active = sum(m.sum() for m in masks.values())
    total = sum(m.size for m in masks.values())
    assert abs(active / total - 0.3) < 0.01
    assert opt.check_invariants() == []


def test_override_naming_no_layer_is_an_error():
    model, _ = nested_model()
    with pytest.raises(ValueError, match="no_such_layer"):
        train_sparse(model, *nested_data(), overrides={"no_such_layer": 0.0})


@pytest.mark.parametrize("case", ["batch_norm_only", "frozen_dense",
                                  "marked_not_prunable"])
def test_model_without_prunable_weights_is_an_error(case):
    dense = keras.layers.Dense(3)
    layers = [keras.Input((6,)), keras.layers.BatchNormalization()]
    if case != "batch_norm_only":
        layers.append(dense)
    model = keras.Sequential(layers)
    if case == "frozen_dense":
        dense.trainable = False
    elif case == "marked_not_prunable":
        kft.mark_not_prunable(dense.kernel)
    opt = kft.SparseOptimizer(keras.optimizers.SGD(0.1))
    model.compile(optimizer=opt, loss="mse")
    x = np.ones((8, 6), "float32")
    with pytest.raises(ValueError, match="no prunable weights"):
        model.fit(x, np.ones((8, 3 if case != "batch_norm_only" else 6)),
                  verbose=0)


def test_kernel_roles_is_the_one_answer_for_built_in_layers():
    from keras_freetickets import prunable as prunable_lib

    cases = [
        (keras.layers.Dense(4), (None, 3), [("kernel", "dense")]),
        (keras.layers.EinsumDense("ab,bc->ac", output_shape=4), (None, 3),
         [("kernel", "einsum")]),
        (keras.layers.Conv2D(4, 3), (None, 8, 8, 2), [("kernel", "conv")]),
        (keras.layers.Conv2DTranspose(4, 3), (None, 8, 8, 2),
         [("kernel", "transpose")]),
        (keras.layers.SeparableConv2D(4, 3), (None, 8, 8, 2),
         [("depthwise_kernel", "conv"), ("pointwise_kernel", "conv")]),
        (keras.layers.BatchNormalization(), (None, 3), []),
        (keras.layers.LSTM(4), (None, 5, 3), []),
    ]
    for layer, shape, expected in cases:
        layer.build(shape)
        roles = list(prunable_lib.kernel_roles(layer))
        assert roles == expected, type(layer).__name__
        for attribute, kind in roles:
            assert kind in prunable_lib.KERNEL_KINDS
            variable = prunable_lib.kernel_variable(layer, attribute)
            assert variable is not None and len(variable.shape) >= 2
            # The flops count and the pruning rule agree on these weights.
            assert prunable_lib.prunable_variables([variable]) == [variable]
