"""Meta-learned unsupervised update rules (Metz et al., ICLR 2019) on ``trainstep``.

The rule is a :class:`trainstep.TrainStep` whose ``hparams`` are the meta-parameters θ
(:func:`make_rule_step`); an episode of it on a task, scored by a few-shot ridge readout, is *what is
unrolled* (:func:`make_meta_unroll`); truncated backprop, antithetic ES and PES are *how its gradient is
estimated* (:mod:`meta_rules.estimators`); Adam with clipping is *how θ is updated*
(:func:`make_meta_train_step`).
"""

from meta_rules.base_model import (
    ACTIVATIONS,
    activation_fn,
    base_forward,
    check_params,
    init_base_mlp,
    representation,
    with_backward_weights,
)
from meta_rules.estimators import (
    ESTIMATORS,
    EstimatorOutput,
    GradientEstimator,
    PESState,
    antithetic_es,
    init_pes_states,
    init_states,
    make_estimator,
    pes,
    truncated_backprop,
)
from meta_rules.evaluate import FewShotConfig, evaluate_methods, few_shot_logistic_accuracy
from meta_rules.io import apply_rule, load_theta, save_theta
from meta_rules.meta_train import MetaTrainState, make_meta_train_step, meta_optimizer, meta_train
from meta_rules.objective import (
    MetaState,
    TruncatedUnroll,
    UnrollConfig,
    evaluate_rule,
    make_meta_unroll,
    task_readout_loss,
)
from meta_rules.readout import few_shot_ridge_accuracy, few_shot_ridge_loss, ridge_fit
from meta_rules.rule import RuleConfig, RuleState, check_theta, init_theta, make_rule_step, rule_updates
from meta_rules.tasks import (
    Task,
    TaskConfig,
    class_subset_task_fn,
    clustered_task_fn,
    digits_task_fn,
    meta_train_task_fn,
    mixture_task_fn,
    mnist1d_task_fn,
)

__all__ = [
    "ACTIVATIONS", "ESTIMATORS", "EstimatorOutput", "FewShotConfig", "GradientEstimator", "MetaState",
    "MetaTrainState",
    "PESState", "RuleConfig", "RuleState", "Task", "TaskConfig", "TruncatedUnroll", "UnrollConfig",
    "activation_fn", "antithetic_es", "apply_rule", "base_forward", "check_params", "check_theta",
    "class_subset_task_fn", "clustered_task_fn", "digits_task_fn", "evaluate_methods", "evaluate_rule",
    "few_shot_logistic_accuracy", "few_shot_ridge_accuracy",
    "few_shot_ridge_loss", "init_base_mlp", "init_pes_states", "init_states", "init_theta", "load_theta",
    "make_estimator", "make_meta_train_step", "make_meta_unroll", "make_rule_step", "meta_optimizer", "meta_train",
    "meta_train_task_fn", "mixture_task_fn", "mnist1d_task_fn", "pes", "representation", "ridge_fit",
    "rule_updates", "save_theta", "task_readout_loss", "truncated_backprop", "with_backward_weights",
]
