"""Trains the DST Ensemble member of this worker (one process per member).

Run by tests/test_distributed_multiworker.py, one process per worker, each
with a `TF_CONFIG` that only numbers it (no strategy is created: the members
train independently):

    python mwms_dst_member.py MEMBER_DIR NUM_MEMBERS

The member index comes from `keras_freetickets.distributed
.member_index_from_cluster()`; `train_dst_ensemble` writes
`MEMBER_DIR/member_<index>.kftm` atomically.
"""

import sys

import numpy as np


def main(member_dir, num_members):
    import keras

    import keras_freetickets as kft
    from keras_freetickets import distributed

    index = distributed.member_index_from_cluster()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(512, 20)).astype("float32")
    y = (x @ rng.normal(size=(20, 3))).argmax(1).astype("int64")

    def build_model():
        return keras.Sequential([
            keras.Input((20,)),
            keras.layers.Dense(32, activation="relu", name="hidden"),
            keras.layers.Dense(3, name="logits"),
        ], name="mlp")

    result = kft.train_dst_ensemble(
        build_model, (x, y), num_members=num_members, sparsity=0.8,
        member_dir=member_dir, member_index=index, epochs=2, batch_size=64,
        update_interval=4, verbose=0,
    )
    if result["trained"] != [index]:
        raise SystemExit(f"worker trained {result['trained']}, not [{index}]")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
