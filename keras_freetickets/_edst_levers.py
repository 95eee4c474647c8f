"""The EDST diversity levers of `EDSTCallback`: their checks and presets."""

from keras_freetickets._validation import check_bool
from keras_freetickets._validation import check_fraction
from keras_freetickets._validation import check_number
from keras_freetickets._validation import check_one_of
from keras_freetickets.schedules import LEARNING_RATE_PLANS

REFINEMENT_DECAYS = ("constant", "cosine")
GROW_INITS = {"zeros": 0.0, "random": 1.0}
# The paper code's EDST: `EDSTCallback(preset="official")`.
OFFICIAL_LEVERS = dict(
    learning_rate_plan="official", restart_height=None, global_grow="random",
    global_drop_fraction=0.8, exclude_dropped=False, novelty=0.0,
    refinement_drop_fraction=None, refinement_drop_decay="constant",
    global_grow_init="zeros",
)
PRESETS = ("official",)

# EDSTCallback's defaults for the levers, chosen by measurement on
# FMNIST-MLP v2 (benchmarks/edst_v2.py).
DEFAULT_LEVERS = dict(
    learning_rate_plan="cosine", restart_height=None, global_grow="random",
    global_drop_fraction=0.98, exclude_dropped=True, novelty=0.0,
    refinement_drop_fraction=None, refinement_drop_decay="constant",
    global_grow_init="random",
)


def validate(preset, levers):
    """Checks the levers (after applying `preset`); returns them normalized."""
    if preset is not None:
        levers = _apply_preset(preset, levers)
    plan = levers["learning_rate_plan"] or DEFAULT_LEVERS["learning_rate_plan"]
    if not callable(plan) and plan not in LEARNING_RATE_PLANS:
        raise ValueError(
            "Argument `learning_rate_plan` must be one of "
            f"{list(LEARNING_RATE_PLANS)} or a callable. Received: "
            f"learning_rate_plan={plan!r}"
        )
    if levers["restart_height"] is not None:
        check_number("restart_height", levers["restart_height"], 0, strict=True)
    check_one_of("global_grow", levers["global_grow"], ("random", "gradient", None))
    check_fraction("global_drop_fraction", levers["global_drop_fraction"])
    check_bool("exclude_dropped", levers["exclude_dropped"])
    check_number("novelty", levers["novelty"], 0)
    if levers["refinement_drop_fraction"] is not None:
        check_fraction("refinement_drop_fraction",
                       levers["refinement_drop_fraction"])
    for name, allowed in (("refinement_drop_decay", REFINEMENT_DECAYS),
                          ("global_grow_init", GROW_INITS)):
        check_one_of(name, levers[name], allowed)
    height = levers["restart_height"]
    fraction = levers["refinement_drop_fraction"]
    return dict(
        levers, learning_rate_plan=plan,
        restart_height=None if height is None else float(height),
        global_drop_fraction=float(levers["global_drop_fraction"]),
        exclude_dropped=bool(levers["exclude_dropped"]),
        novelty=float(levers["novelty"]),
        refinement_drop_fraction=None if fraction is None else float(fraction),
    )


def _apply_preset(preset, given):
    """The levers of `preset`; a lever also given explicitly must agree."""
    check_one_of("preset", preset, PRESETS)
    for name, value in given.items():
        if value != DEFAULT_LEVERS[name] and value != OFFICIAL_LEVERS[name] \
                and not (name == "learning_rate_plan" and value is None):
            raise ValueError(
                f"preset={preset!r} sets `{name}` to "
                f"{OFFICIAL_LEVERS[name]!r}. Received also: {name}={value!r}"
            )
    return dict(OFFICIAL_LEVERS)

