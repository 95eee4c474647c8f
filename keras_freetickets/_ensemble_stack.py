"""The members' probabilities, stacked: the per-member path of
`FreeTicketsEnsemble`'s inference, and the helper model behind its
`member_predictions`."""

import keras
from keras import ops

from keras_freetickets._ensemble_batched import live_weight


class MemberStack(keras.Model):
    """Helper model: members' probabilities stacked on axis 1, (N, M, ...).

    Batch-major so that `predict` can concatenate batches. It shares the
    member objects (no copy, no variables of its own) and is never saved.
    """

    def __init__(self, member_models, member_output, plan=None, runners=None):
        super().__init__(name="free_tickets_member_stack")
        # Not tracked: the members belong to the ensemble.
        object.__setattr__(self, "_member_models", list(member_models))
        object.__setattr__(self, "_kind", member_output)
        object.__setattr__(self, "_batched_plan", plan)
        # The ensemble's `_inference_runners`, asked at trace time.
        object.__setattr__(self, "_runners", runners)
        self.built = True

    def call(self, inputs):
        if self._batched_plan is not None:
            return self._batched_plan.probabilities(
                inputs, self._kind, live_weight, axis=1
            )
        return stacked_probabilities(
            self._member_models, self._kind, inputs, training=False, axis=1,
            runners=None if self._runners is None else self._runners(),
        )


def stacked_probabilities(member_models, member_output, inputs, training, axis,
                           runners=None):
    """All members' probabilities, stacked on `axis` (0: (M, N, ...)); a
    member with a runner in `runners` runs through it."""
    outputs = []
    for index, member in enumerate(member_models):
        runner = None if runners is None else runners[index]
        if runner is not None:
            y = ops.cast(runner(inputs), "float32")
        else:
            y = ops.cast(member(inputs, training=training), "float32")
        if member_output == "logits":
            y = ops.softmax(y, axis=-1)
        outputs.append(y)
    return ops.stack(outputs, axis=axis)
