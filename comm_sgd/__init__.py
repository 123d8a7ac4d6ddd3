"""Local SGD and communication schedules (Stich 2019; Patel & Dieuleveut 2019) on ``trainstep``."""

from comm_sgd.local_sgd import (
    LocalSGDState,
    SyncBatch,
    local_sgd,
    output_params,
    tree_nbytes,
    worker_mean,
)
from comm_sgd.parallel import (
    fetch,
    initialize_distributed,
    parallel_local_sgd,
    schedule_batch_fn,
    worker_mesh,
    worker_output,
    worker_params,
)
from comm_sgd.schedules import (
    ScheduleError,
    SyncSchedule,
    at_steps,
    every,
    fixed,
    increasing,
    increasing_for,
    once,
    parse_schedule,
    post_local,
)
from comm_sgd.step_sizes import (
    IterateAverage,
    parse_step_size,
    polynomial_step_size,
    stich_shift,
    stich_step_size,
)

__all__ = [
    "IterateAverage", "LocalSGDState", "ScheduleError", "SyncBatch", "SyncSchedule", "at_steps", "every", "fetch",
    "fixed", "increasing", "increasing_for", "initialize_distributed", "local_sgd", "once", "output_params",
    "parallel_local_sgd", "parse_schedule", "parse_step_size", "polynomial_step_size", "post_local",
    "schedule_batch_fn", "stich_shift", "stich_step_size", "tree_nbytes", "worker_mean", "worker_mesh",
    "worker_output", "worker_params",
]
