"""trainstep: the differentiable training-step core shared by every package of the library.

A training step is a pure function ``step(state, batch, hparams, key) -> (state, metrics)``;
:func:`unroll` runs it in ``lax.scan``, differentiably with respect to ``hparams``.
"""

from trainstep.core import TrainState, TrainStep, gradient_step, unroll
from trainstep.data import (
    DataError,
    Dataset,
    load_dataset,
    load_digits,
    load_mnist1d,
    load_npz,
    minibatch_fn,
)
from trainstep.hypergrad import hypergradient, unrolled_validation_loss
from trainstep.runner import ConfigError, NonFiniteLossError, RunOutput, run_chunked, write_json_atomic

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "DataError",
    "Dataset",
    "NonFiniteLossError",
    "RunOutput",
    "TrainState",
    "TrainStep",
    "gradient_step",
    "hypergradient",
    "load_dataset",
    "load_digits",
    "load_mnist1d",
    "load_npz",
    "minibatch_fn",
    "run_chunked",
    "unroll",
    "unrolled_validation_loss",
    "write_json_atomic",
]
