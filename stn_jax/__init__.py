"""Self-Tuning Networks (MacKay et al. 2019) and Delta-STN (Bae & Grosse 2020) on ``trainstep``."""

from stn_jax.hparams import HParam, HParamError, HParamSpace
from stn_jax.layers import (
    BestResponseConv,
    BestResponseDense,
    best_response_conv,
    best_response_dense,
    init_best_response_conv,
    init_best_response_dense,
    response_mask,
    split_response,
)
from stn_jax.regularizers import dropout, gaussian_noise, l2_penalty, random_shift
from stn_jax.stn import STN, STNConfig, STNState, make_stn

__all__ = [
    "STN", "BestResponseConv", "BestResponseDense", "HParam", "HParamError", "HParamSpace", "STNConfig", "STNState",
    "best_response_conv", "best_response_dense", "dropout", "gaussian_noise", "init_best_response_conv",
    "init_best_response_dense", "l2_penalty", "make_stn", "random_shift", "response_mask", "split_response",
]
