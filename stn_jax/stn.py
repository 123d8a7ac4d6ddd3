"""Self-Tuning Networks (MacKay et al. 2019) and Delta-STN (Bae & Grosse 2020) as two alternating
``trainstep`` steps.

The user describes the model with three pure functions:

* ``predict(params, x, h, hvals, key, train) -> outputs``: the network with best-response layers
  (:mod:`stn_jax.layers`). ``h`` ``(B, n_h)`` is the hypernetwork input (the unconstrained
  hyperparameters, centred on the current value for Delta-STN); ``hvals`` maps each
  hyperparameter's name to its constrained per-example value ``(B,)``, for the regularisers
  (dropout, noise, augmentation), applied only when ``train`` is true.
* ``loss(outputs, y) -> (B,)``: the per-example loss (the same for training and validation).
* ``penalty(params, h, hvals) -> scalar``: terms of the *training* loss only (e.g. weight decay
  with a per-batch ``hvals["weight_decay"]``, on the weights the response gives at ``h``); may be
  ``None``. It always receives an array ``h``.

A ``predict`` that only hands ``h`` on to :mod:`stn_jax.layers` (as :mod:`stn_jax.mlp` does) may
declare so with ``make_stn(..., passes_h_to_layers=True)``: Delta-STN then passes ``h=None`` (the
response off) where ``h`` is zero (the general weights' objective, ``predict_at``) and
:class:`stn_jax.layers.Centred` to the linearisation, and skips computing a response whose value
is zero and its zero-valued derivatives: the same values and gradients, a linearised Delta-STN
weight step ~1.75x faster on the official MLP (``benchmarks/bench_stn.py``).

Weight step (training data): draw ``u~ = u + sigma * eps`` per example (per batch for hyperparameters
declared so), minimise the training loss at ``u~`` with respect to the weights only. Delta-STN
trains the general weights on the unperturbed loss and the response weights on the perturbed one,
optionally with the network linearised in its response (``jax.jvp``).

Hyper step (validation data): regularisers off, minimise the validation loss of the weights'
response at ``u~`` with respect to ``(u, s)`` only (the weights are constants, so the gradient to
the hyperparameters flows through the response alone), minus ``tau`` times the entropy of the
perturbation.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax
from jax import lax

from stn_jax.hparams import HParamSpace
from stn_jax.layers import Centred, response_mask
from trainstep.core import TrainState, TrainStep, gradient_step
from trainstep.runner import ConfigError

PyTree = Any


class STNState(NamedTuple):
    """The two halves of an STN: weights (general and response) and hyperparameters.

    ``hyper.params`` is ``{"u": unconstrained values (n_h,), "s": perturbation scales (n_h,)}`` with
    ``sigma = softplus(s)``."""

    weights: TrainState
    hyper: TrainState


@dataclasses.dataclass(frozen=True)
class STNConfig:
    """How an STN trains.

    Attributes:
      t_train, t_val: weight steps and hyper steps per cycle (5:1 and 2:1 in the official code).
      entropy_weight: ``tau``, the weight of the perturbation's entropy in the hyper objective.
      tune_scales: learn ``sigma``; otherwise it stays at its declared value.
      delta: Delta-STN (centred response, split objectives).
      linearize: Delta-STN's linearisation of the network in its response (needs ``delta``).
      centre_at_init: STN only: the hypernetwork sees ``u~ - u_0``, the offset from the initial
        values, instead of the raw unconstrained values ``u~``. The model class is the same (the
        constant ``-(u_0 V) * (x W_r)`` is a linear map that the general weights can absorb), but
        the response starts near zero, so that the initial best-response network is its plain
        counterpart rather than one modulated by unconstrained values far from zero (a weight decay
        of 1e-4 is ``log 1e-4 = -9.2``). Delta-STN centres on the current values instead.
    """

    t_train: int = 5
    t_val: int = 1
    entropy_weight: float = 1e-3
    tune_scales: bool = True
    delta: bool = False
    linearize: bool = False
    centre_at_init: bool = False

    def __post_init__(self):
        if self.t_train < 1 or self.t_val < 1:
            raise ConfigError(f"t_train and t_val must be >= 1, got {self.t_train}, {self.t_val}")
        if self.linearize and not self.delta:
            raise ConfigError("linearize is part of Delta-STN: set delta=True as well")
        if self.centre_at_init and self.delta:
            raise ConfigError("centre_at_init is for STN: Delta-STN centres on the current values")
        if self.entropy_weight < 0:
            raise ConfigError(f"entropy_weight must be >= 0, got {self.entropy_weight}")


class STN(NamedTuple):
    """The pieces of a Self-Tuning Network (all pure functions).

    Attributes:
      init: ``init(params) -> STNState`` from the network's initial parameters.
      weight_step: a :class:`TrainStep` on ``STNState`` with a training batch ``(x, y)``.
      hyper_step: a :class:`TrainStep` on ``STNState`` with a validation batch ``(x, y)``.
      cycle_step: ``t_train`` weight steps then ``t_val`` hyper steps; its batch is
        ``(train_batches, val_batches)`` stacked along leading axes ``t_train`` and ``t_val``.
        Metrics: the hyperparameters' values and scales after the cycle, the mean training (``loss``) and
        validation losses.
      predict_at: ``predict_at(state, x) -> outputs`` at the current hyperparameters, no
        regularisers (evaluation).
      space: the hyperparameters.
      config: the :class:`STNConfig`.
    """

    init: Callable[..., STNState]
    weight_step: TrainStep
    hyper_step: TrainStep
    cycle_step: TrainStep
    predict_at: Callable[[STNState, jax.Array], jax.Array]
    space: HParamSpace
    config: STNConfig


def make_stn(
    space: HParamSpace,
    predict: Callable,
    loss: Callable[[jax.Array, jax.Array], jax.Array],
    *,
    penalty: Optional[Callable] = None,
    weight_optimizer: optax.GradientTransformation,
    hyper_optimizer: optax.GradientTransformation,
    config: STNConfig = STNConfig(),
    passes_h_to_layers: bool = False,
) -> STN:
    """Builds an :class:`STN` (see the module docstring for ``predict``, ``loss``, ``penalty``).

    ``passes_h_to_layers``: ``predict`` accepts ``h=None`` and ``h=Centred(d)`` (it hands ``h``
    unchanged to best-response layers), so that Delta-STN can skip the zero response at its centre.
    """
    n_h = len(space)
    tau = config.entropy_weight
    skip_centre = config.delta and passes_h_to_layers

    u_ref = space.init_unconstrained()

    def hnet_input(u_tilde, u):
        if config.delta:
            return u_tilde - lax.stop_gradient(u)[None, :]
        return u_tilde - u_ref[None, :] if config.centre_at_init else u_tilde

    def train_objective(params, x, y, h, hvals, key, h_predict=None):
        out = predict(params, x, h if h_predict is None else h_predict, hvals, key, True)
        value = jnp.mean(loss(out, y))
        if penalty is not None:
            value = value + penalty(params, h, hvals)
        return value

    # ---- weight step -------------------------------------------------------------------
    def weight_loss(params, batch, hyper, key):
        x, y = batch
        u, s = lax.stop_gradient(hyper["u"]), lax.stop_gradient(hyper["s"])
        b = jax.tree.leaves(x)[0].shape[0]
        k_pert, k_model = jax.random.split(key)
        u_tilde = space.perturb(k_pert, u, s, b)
        hv_tilde = space.constrain(u_tilde, round_discrete=True)
        h = hnet_input(u_tilde, u)
        if not config.delta:
            return train_objective(params, x, y, h, hv_tilde, k_model), {}
        mask = response_mask(params)
        general_only = jax.tree.map(lambda m, p: lax.stop_gradient(p) if m else p, mask, params)
        response_only = jax.tree.map(lambda m, p: p if m else lax.stop_gradient(p), mask, params)
        hv = space.constrain(jnp.broadcast_to(u, (b, n_h)), round_discrete=True)
        # General weights: the unperturbed training loss (centred input 0: the response is off).
        centre = jnp.zeros_like(h)
        l_general = train_objective(general_only, x, y, centre, hv, k_model,
                                    h_predict=(None if skip_centre else centre))
        # Response weights: the perturbed training loss.
        if config.linearize:
            def f(hh):
                return predict(response_only, x, Centred(hh) if skip_centre else hh, hv_tilde, k_model, True)
            out0, tangent = jax.jvp(f, (centre,), (h,))
            l_resp = jnp.mean(loss(out0 + tangent, y))
            if penalty is not None:
                l_resp = l_resp + penalty(response_only, h, hv_tilde)
        else:
            l_resp = train_objective(response_only, x, y, h, hv_tilde, k_model)
        return l_general + l_resp, {"perturbed_loss": l_resp}

    weights_ts = gradient_step(weight_loss, weight_optimizer)

    # ---- hyper step --------------------------------------------------------------------
    def hyper_loss(hyper, batch, params, key):
        x, y = batch
        params = lax.stop_gradient(params)
        u, s = hyper["u"], hyper["s"]
        b = jax.tree.leaves(x)[0].shape[0]
        if config.tune_scales:
            eps = jax.random.normal(key, (b, n_h), u.dtype)
            u_tilde = u[None, :] + jax.nn.softplus(s)[None, :] * eps
        else:
            u_tilde = jnp.broadcast_to(u, (b, n_h))
        h = hnet_input(u_tilde, u)
        hv = space.constrain(u_tilde, round_discrete=True)
        out = predict(params, x, h, hv, key, False)
        val = jnp.mean(loss(out, y))
        objective = val - tau * space.entropy(s) if config.tune_scales else val
        return objective, {"val_loss": val}

    hyper_ts = gradient_step(hyper_loss, hyper_optimizer)

    def init(params) -> STNState:
        hyper = {"u": space.init_unconstrained(), "s": space.init_scale_param()}
        return STNState(weights_ts.init(params), hyper_ts.init(hyper))

    def weight_step(state: STNState, batch, hparams, key):
        del hparams
        w, metrics = weights_ts.step(state.weights, batch, state.hyper.params, key)
        return STNState(w, state.hyper), metrics

    def hyper_step(state: STNState, batch, hparams, key):
        del hparams
        h, metrics = hyper_ts.step(state.hyper, batch, state.weights.params, key)
        if not config.tune_scales:
            h = h._replace(params={"u": h.params["u"], "s": state.hyper.params["s"]})
        return STNState(state.weights, h), metrics

    def cycle_step(state: STNState, batch, hparams, key):
        del hparams
        train_batches, val_batches = batch
        k_w, k_h = jax.random.split(key)

        def wbody(s, i):
            return weight_step(s, jax.tree.map(lambda a: a[i], train_batches), None, jax.random.fold_in(k_w, i))

        def hbody(s, i):
            return hyper_step(s, jax.tree.map(lambda a: a[i], val_batches), None, jax.random.fold_in(k_h, i))

        state, wm = lax.scan(wbody, state, jnp.arange(config.t_train))
        state, hm = lax.scan(hbody, state, jnp.arange(config.t_val))
        u = state.hyper.params["u"]
        metrics = {"loss": jnp.mean(wm["loss"]), "val_loss": jnp.mean(hm["val_loss"]),
                   "u": u, "sigma": jax.nn.softplus(state.hyper.params["s"])}
        for name, v in space.constrain(u).items():
            metrics[f"hp/{name}"] = v
        return state, metrics

    def predict_at(state: STNState, x):
        u = state.hyper.params["u"]
        b = jax.tree.leaves(x)[0].shape[0]
        ub = jnp.broadcast_to(u, (b, n_h))
        h = None if skip_centre else hnet_input(ub, u)
        return predict(state.weights.params, x, h, space.constrain(ub, round_discrete=True), jax.random.key(0), False)

    return STN(init=init, weight_step=TrainStep(init, weight_step), hyper_step=TrainStep(init, hyper_step),
               cycle_step=TrainStep(init, cycle_step), predict_at=predict_at, space=space, config=config)
