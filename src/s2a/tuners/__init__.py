"""The "S" of S2A: activation-friendly tunable modules on a frozen backbone.

* :class:`S2AConfig` — what to insert and how to store activations;
* :func:`apply` — freeze, insert bias / norm scales / low-rank prompt / side branch, keep the head
  trainable, compress activations (in place);
* :func:`trainable_parameters`, :func:`save_tuned`, :func:`load_tuned`, :func:`merge`.
"""

from .bias import add_bias, train_norm_weights
from .config import S2AConfig
from .model import TunerState, apply, backbone_fingerprint, get_state, is_applied
from .prompt import LowRankPrompt, add_prompts
from .utils import (
    TrainableParameters,
    load_tuned,
    merge,
    read_tuned,
    save_tuned,
    trainable_parameters,
    tuned_state_dict,
)

__all__ = [
    "LowRankPrompt",
    "S2AConfig",
    "TrainableParameters",
    "TunerState",
    "add_bias",
    "add_prompts",
    "apply",
    "backbone_fingerprint",
    "get_state",
    "is_applied",
    "load_tuned",
    "merge",
    "read_tuned",
    "save_tuned",
    "train_norm_weights",
    "trainable_parameters",
    "tuned_state_dict",
]
