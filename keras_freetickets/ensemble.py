"""`FreeTicketsEnsemble`: a Keras model that averages its members' softmax."""

import os
import weakref

import keras
import numpy as np
from keras import ops

from keras_freetickets import members as members_lib
from keras_freetickets._ensemble_batched import BatchedPlan
from keras_freetickets._ensemble_batched import live_weight
from keras_freetickets._ensemble_checks import check_output_kind
from keras_freetickets._ensemble_checks import check_probabilities
from keras_freetickets._ensemble_checks import member_shapes
from keras_freetickets._ensemble_conv import CONV_KERNELS
from keras_freetickets._ensemble_conv import ConvRunner
from keras_freetickets._ensemble_conv import use_compiled_conv
from keras_freetickets._ensemble_stack import MemberStack
from keras_freetickets._ensemble_stack import stacked_probabilities
from keras_freetickets._validation import check_bool
from keras_freetickets._validation import check_one_of

_OUTPUT_KINDS = ("logits", "probabilities")

# Per-ensemble helper models for `member_predictions`, kept outside the
# ensemble's attributes so that Keras neither tracks nor saves them.
_STACK_MODELS = weakref.WeakKeyDictionary()


@keras.saving.register_keras_serializable(package="keras_freetickets")
class FreeTicketsEnsemble(keras.Model):
    """An ensemble whose prediction is the mean of its members' probabilities.

    Each member is a Keras model with one input and one output of the same
    shapes as every other member's (classification: `(batch, classes)`; any
    rank works, the softmax is over the last axis). `call` evaluates all
    members on the batch in one traced graph, converts their outputs to
    probabilities (softmax of logits, or the outputs themselves) and returns
    their mean, so `ensemble.predict(x)` costs one `predict` call whatever
    the number of members. The members are ordinary sublayers: the ensemble
    saves to and loads from `.keras` files (weights are stored by member
    position, so members with identical layer names are not mixed up), and a
    member's exact zeros survive the round trip.

    `output` is checked against each member's final layer when it can be
    determined (a `Softmax` layer or a layer whose `activation` is softmax
    outputs probabilities; a linear activation outputs logits): softmax under
    `output="logits"` (softmax applied twice) and linear under
    `output="probabilities"` (logits averaged as probabilities) are errors.
    Members whose final activation cannot be read (subclassed models) are
    checked at `member_predictions` time under `output="probabilities"`: rows
    must be non-negative and sum to 1.

    With `batched=True`, inference (`predict`, `member_predictions`, a call
    with `training=False`, and `export`) runs the members as one batched
    program where their layers allow it (plain Sequential members of equal
    shapes made of Dense, Conv2D, pooling, Flatten and activation layers; see
    `BatchedPlan`): the first layer runs once with the M kernels concatenated,
    later Dense layers as one batched matmul, later Conv2D layers on the
    members' stacked channels. Other members run one by one as before. It
    computes the same probabilities (within float rounding, about 1e-7). It
    is off by default because on the 2-core CPUs it was measured on it was
    slower than the per-member graph, whose independent member branches
    TensorFlow already runs in parallel (`benchmarks/storage_and_inference.py`,
    "Ensemble inference").

    `conv_kernels` chooses how inference (outside `batched`) runs the
    members' `Conv2D` layers. Where `keras_freetickets.native` has built its
    sparse convolution (`scripts/setup.sh` does), a plain Sequential member's
    `Conv2D` layers with strides 1, ReLU or linear activation and float32
    weights run through it: it reads only the kernel's nonzeros, with the
    ReLU and a following `MaxPooling2D(2)` fused in, so its cost follows the
    members' sparsity. On the 2-core CPU it was measured on it made an
    M = 3 FMNIST-CNN ensemble's `predict` at batch 1024 1.8x as fast (README,
    "Ensemble inference on CPU"), so `"auto"` (the default) uses it
    wherever it is built and no GPU is visible; `"dense"` keeps TensorFlow's
    convolution; `"compiled"` requires the op and raises at inference where
    it is not built. The probabilities agree with TensorFlow's convolution
    within float rounding (the sums run in another order). Training,
    XLA-compiled functions and `export` always use TensorFlow's convolution.

    Args:
        members: list of built `keras.Model`s, at least one, distinct objects,
            sharing input and output shapes.
        output: str. What the members output: `"logits"` (the default; a
            softmax is applied) or `"probabilities"`.
        batched: bool. Whether inference runs the members as one batched
            program where their layers allow it (default False).
        conv_kernels: str. `"auto"` (default), `"dense"` or `"compiled"`:
            how inference runs the members' eligible `Conv2D` layers (see
            above; ignored where `batched` runs the members).
        name: Optional str. The ensemble's name.
        **kwargs: Base `keras.Model` arguments (`trainable`, `dtype`).

    Example:

    ```python
    members = [
        keras.Sequential([keras.Input((20,)), keras.layers.Dense(3)])
        for _ in range(3)
    ]
    ensemble = FreeTicketsEnsemble(members, output="logits")
    probs = ensemble.predict(np.zeros((8, 20), "float32"))      # (8, 3)
    per_member = ensemble.member_predictions(np.zeros((8, 20)))  # (3, 8, 3)
    ```
    """

    def __init__(self, members, output="logits", batched=False, name=None,
                 conv_kernels="auto", **kwargs):
        super().__init__(name=name, **kwargs)
        check_bool("batched", batched)
        check_one_of("conv_kernels", conv_kernels, CONV_KERNELS)
        if isinstance(members, keras.Model) or not isinstance(members, (list, tuple)):
            raise ValueError(
                "Argument `members` must be a list of Keras models. "
                f"Received: members={members!r}"
            )
        if len(members) < 1:
            raise ValueError(
                "Argument `members` must hold at least one model. "
                f"Received: num_members={len(members)}"
            )
        for index, member in enumerate(members):
            if not isinstance(member, keras.Model):
                raise ValueError(
                    "Every member must be a `keras.Model`. Received: "
                    f"members[{index}]={member!r} of type {type(member).__name__}"
                )
        if len({id(m) for m in members}) != len(members):
            raise ValueError(
                "Every member must be a distinct model object; the same model "
                "was passed more than once."
            )
        check_one_of("output", output, _OUTPUT_KINDS)
        shapes = [member_shapes(m, i) for i, m in enumerate(members)]
        input_shapes = {tuple(s[0][1:]) for s in shapes}
        output_shapes = {tuple(s[1][1:]) for s in shapes}
        if len(input_shapes) > 1 or len(output_shapes) > 1:
            listing = "; ".join(
                f"member {i} ('{m.name}'): input {s[0]}, output {s[1]}"
                for i, (m, s) in enumerate(zip(members, shapes))
            )
            raise ValueError(
                f"All members must share input and output shapes. Received: {listing}"
            )
        for index, member in enumerate(members):
            check_output_kind(member, index, output)
        self._members = list(members)
        self._member_output = output
        self._member_input_shape = tuple(shapes[0][0])
        self._member_output_shape = tuple(shapes[0][1])
        self._batched = bool(batched)
        self._conv_kernels = conv_kernels
        # Built on first use; not tracked (they hold no variables of their own).
        object.__setattr__(self, "_plan", _UNPLANNED)
        object.__setattr__(self, "_conv_runners", _UNPLANNED)
        self.built = True

    @property
    def members(self):
        """The member models, in order (a new list; the models are shared)."""
        return list(self._members)

    @property
    def num_members(self):
        """The number of members, M."""
        return len(self._members)

    @property
    def member_output(self):
        """What the members output: `"logits"` or `"probabilities"`."""
        return self._member_output

    @property
    def batched(self):
        """Whether inference runs the members as one batched program.

        True when the constructor's `batched` was True and the members'
        layers allow it (see the class docstring); False otherwise.
        """
        return self.batched_plan() is not None

    @property
    def member_input_shape(self):
        """The members' input shape, batch axis first (a tuple)."""
        return self._member_input_shape

    def batched_plan(self):
        """The `BatchedPlan` inference runs, or None when it runs the members
        one by one (`batched=False`, or members that cannot run batched)."""
        if not self._batched:
            return None
        if self._plan is _UNPLANNED:
            object.__setattr__(self, "_plan", BatchedPlan.build(self._members))
        return self._plan

    @property
    def conv_kernels(self):
        """The constructor's `conv_kernels`: `"auto"`, `"dense"` or
        `"compiled"`."""
        return self._conv_kernels

    def compiled_conv_layers(self):
        """Per member, the names of the layers that inference runs through
        the compiled sparse convolution now (a fused pooling layer
        included); empty lists where it runs TensorFlow's convolution."""
        runners = self._inference_runners()
        return [[] if r is None else r.layer_names for r in runners]

    def _inference_runners(self):
        """Per member, the `ConvRunner` inference uses, or None for the
        member's own call."""
        if self.batched_plan() is not None or not use_compiled_conv(
                self._conv_kernels):
            return [None] * len(self._members)
        if self._conv_runners is _UNPLANNED:
            object.__setattr__(self, "_conv_runners",
                               [ConvRunner.build(m) for m in self._members])
        return self._conv_runners

    def call(self, inputs, training=False):
        plan = None if training else self.batched_plan()
        if plan is not None:
            stacked = plan.probabilities(
                inputs, self._member_output, live_weight, axis=1
            )
            return ops.mean(stacked, axis=1)
        stacked = stacked_probabilities(
            self._members, self._member_output, inputs, training, axis=0,
            runners=None if training else self._inference_runners(),
        )
        return ops.mean(stacked, axis=0)

    def compute_output_shape(self, input_shape):
        return (input_shape[0],) + tuple(self._member_output_shape[1:])

    def member_predictions(self, x, batch_size=None, verbose=0, steps=None):
        """Each member's probabilities on `x`, as one numpy array.

        All members run in one traced graph per batch (through a `predict`
        call on a helper model that shares the members), so the cost is that
        of `ensemble.predict`.

        Args:
            x: Input data accepted by `keras.Model.predict` (numpy array,
                tensor, `tf.data.Dataset` yielding inputs or `(x, y)`,
                `keras.utils.PyDataset`).
            batch_size: Optional int, as in `predict` (default 32 for arrays).
            verbose: Verbosity passed to `predict` (default silent).
            steps: Optional number of batches, as in `predict`.

        Returns:
            A float32 numpy array of shape `(M, N, ...)`: member `m`'s
            probabilities for example `n` at `[m, n]`.
        """
        stack_model = _STACK_MODELS.get(self)
        if stack_model is None:
            stack_model = MemberStack(
                self._members, self._member_output, self.batched_plan(),
                self._inference_runners,
            )
            _STACK_MODELS[self] = stack_model
        per_example = stack_model.predict(
            x, batch_size=batch_size, verbose=verbose, steps=steps
        )
        result = np.moveaxis(np.asarray(per_example), 1, 0)
        if self._member_output == "probabilities":
            check_probabilities(result)
        return result

    def save_members(self, member_dir, overwrite=False, metadata=None):
        """Writes each member to `member_dir` as `member_<index>.kftm`.

        Args:
            member_dir: str or path-like. Created if missing.
            overwrite: bool. Whether existing member files may be replaced.
            metadata: Optional JSON-able dict stored in every member file,
                beside `member_index`, `num_members` and `output`.

        Returns:
            The list of paths written, member 0 first.
        """
        member_dir = os.fspath(member_dir)
        paths = []
        for index, member in enumerate(self._members):
            member_metadata = dict(metadata or {})
            member_metadata.update(
                member_index=index,
                num_members=len(self._members),
                output=self._member_output,
            )
            paths.append(
                members_lib.save_member(
                    member,
                    members_lib.member_path(member_dir, index),
                    metadata=member_metadata,
                    overwrite=overwrite,
                )
            )
        return paths

    def export(self, path, overwrite=False, compact=True, verbose=False,
               kernel_mode="rebuild"):
        """Writes the ensemble as a self-contained SavedModel for TF Serving.

        Signatures: `serving_default` (input `inputs`, float32
        `[batch] + input_shape`; outputs `probabilities`, `classes`,
        `confidence`, `entropy`, `mutual_information`) and `members` (output
        `member_probabilities`, `[batch, M, C]`). Sparse kernels are stored
        compact, the write is atomic, and the result loads without Keras or
        keras_freetickets; see `keras_freetickets.export.export_ensemble`.
        This replaces `keras.Model.export` for ensembles.

        Args:
            path: str or path-like. The SavedModel folder, by convention
                `<base>/<model_name>/<version>` (integer version).
            overwrite: bool. Whether an existing `path` may be replaced.
            compact: bool. Whether sparse kernels are stored compact.
            verbose: bool. Whether to print the endpoints written.
            kernel_mode: str. How compact kernels run in the graph:
                `"rebuild"` (default, folded into dense kernels at load),
                `"rebuild_variables"` or `"sparse_matmul"`; see
                `export_ensemble`.

        Returns:
            The absolute path written, as a string.

        Example:

        ```python
        ensemble.export("serving/fashion/1")
        loaded = tf.saved_model.load("serving/fashion/1")
        loaded.signatures["serving_default"](inputs=tf.zeros([2, 784]))
        ```
        """
        from keras_freetickets import export as export_lib

        return export_lib.export_ensemble(
            self, path, overwrite=overwrite, compact=compact, verbose=verbose,
            kernel_mode=kernel_mode,
        )

    @classmethod
    def from_directory(cls, member_dir, output="logits", custom_objects=None, name=None):
        """Builds an ensemble from the member files of a folder.

        Args:
            member_dir: str or path-like. A folder of `member_<index>.kftm`
                files (see `keras_freetickets.members`), loaded in index order.
            output: str. What the members output, `"logits"` or
                `"probabilities"`.
            custom_objects: Optional dict of custom classes needed to rebuild
                the members.
            name: Optional str. The ensemble's name.

        Returns:
            A `FreeTicketsEnsemble`.

        Raises:
            FileNotFoundError: `member_dir` does not exist.
            ValueError: `member_dir` holds no member file, or the members do
                not share shapes.
        """
        paths = members_lib.list_members(member_dir)
        loaded = [
            members_lib.load_member(path, custom_objects=custom_objects)
            for path in paths
        ]
        return cls(loaded, output=output, name=name)

    def get_config(self):
        member_configs = []
        for member in self._members:
            member_config = keras.saving.serialize_keras_object(member)
            member_config.pop("compile_config", None)
            member_configs.append(member_config)
        return {
            "name": self.name,
            "trainable": self.trainable,
            "dtype": keras.saving.serialize_keras_object(self.dtype_policy),
            "members": member_configs,
            "output": self._member_output,
            "batched": self._batched,
            "conv_kernels": self._conv_kernels,
        }

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        member_configs = config.pop("members")
        loaded = [
            keras.saving.deserialize_keras_object(c, custom_objects=custom_objects)
            for c in member_configs
        ]
        return cls(members=loaded, **config)


_UNPLANNED = object()


def ensemble_from_directory(member_dir, num_members, timeout_s=3600.0,
                            poll_s=5.0, **kwargs):
    """Waits for `num_members` members (`wait_for_members`), then builds the
    ensemble with `FreeTicketsEnsemble.from_directory(member_dir, **kwargs)`.

    Only members 0..M-1 are loaded even if the folder holds more.

    Args:
        member_dir: str or path-like. Folder of member files.
        num_members: int >= 1.
        timeout_s: float >= 0. Seconds to wait at most.
        poll_s: float > 0. Seconds between checks.
        **kwargs: `output`, `custom_objects`, `name` of the ensemble.

    Returns:
        A `FreeTicketsEnsemble`.
    """
    paths = members_lib.wait_for_members(member_dir, num_members, timeout_s, poll_s)
    if len(members_lib.list_members(member_dir, allow_gaps=True)) == num_members:
        return FreeTicketsEnsemble.from_directory(member_dir, **kwargs)
    custom_objects = kwargs.pop("custom_objects", None)
    loaded = [members_lib.load_member(p, custom_objects=custom_objects)
              for p in paths]
    return FreeTicketsEnsemble(loaded, **kwargs)
