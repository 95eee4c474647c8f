"""`ArgumentsConfig`: the config of an object is its constructor's arguments."""


class ArgumentsConfig:
    """Gives a Keras object (a callback) `get_config` / `from_config`.

    The class lists in `CONFIG_ARGUMENTS` the constructor arguments that make
    up its config, each kept as an attribute of the same name; `get_config`
    returns them and `from_config` passes them back to the constructor, so
    that `keras.saving` round-trips the object. Put it before the Keras base
    class.
    """

    CONFIG_ARGUMENTS = ()

    def get_config(self):
        return {name: getattr(self, name) for name in self.CONFIG_ARGUMENTS}

    @classmethod
    def from_config(cls, config):
        return cls(**config)
