"""Reading the cluster description in `TF_CONFIG`: one home for it."""

import json
import os

TF_CONFIG_ENV = "TF_CONFIG"


def read_tf_config(tf_config=None):
    """Parses a cluster description: the one place that reads `TF_CONFIG`.

    `task_info`, `make_strategy("multi_worker")` and `EDSTCallback` (its
    per-worker candidate files) all read the cluster through this function,
    so a `TF_CONFIG` that is not a JSON object fails the same way
    everywhere, with the variable's name and value in the message, instead
    of being ignored or failing deep inside TensorFlow.

    Args:
        tf_config: dict, JSON string or None (read the `TF_CONFIG`
            environment variable; unset or blank means no cluster).

    Returns:
        A dict (empty without a cluster). Its `cluster` and `task` entries,
        when present, are dicts.

    Raises:
        ValueError: the value is not a JSON object, or its `cluster` or
            `task` entry is not an object.

    Example:

    ```python
    os.environ["TF_CONFIG"] = "{cluster: }"
    kft.distributed.read_tf_config()
    # ValueError: TF_CONFIG must be a JSON object ... Received: TF_CONFIG='{cluster: }'
    ```
    """
    source = "Argument `tf_config`"
    name = "tf_config"
    if tf_config is None:
        tf_config = os.environ.get(TF_CONFIG_ENV, "")
        source = name = TF_CONFIG_ENV
    received = tf_config
    if isinstance(tf_config, (bytes, bytearray)):
        tf_config = tf_config.decode("utf-8", errors="replace")
    if isinstance(tf_config, str):
        if not tf_config.strip():
            return {}
        try:
            tf_config = json.loads(tf_config)
        except json.JSONDecodeError as e:
            raise ValueError(
                f"{'TF_CONFIG' if name == TF_CONFIG_ENV else source} must be "
                "JSON: an object such as '{\"cluster\": {\"worker\": "
                "[\"host:port\", ...]}, \"task\": {\"type\": \"worker\", "
                f"\"index\": 0}}}}' (it does not parse: {e}). "
                f"Received: {name}={received!r}"
            ) from e
    if not isinstance(tf_config, dict):
        raise ValueError(
            f"{source} must be a JSON object"
            f"{' (a dict) or None' if name != TF_CONFIG_ENV else ''}. "
            f"Received: {name}={received!r}"
        )
    for key in ("cluster", "task"):
        value = tf_config.get(key)
        if value is not None and not isinstance(value, dict):
            raise ValueError(
                f"{source}'s `{key}` must be a JSON object. "
                f"Received: {name}={received!r}"
            )
    return tf_config
