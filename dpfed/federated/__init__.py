"""Federated learning with user-level DP: client data on device, client sampling, the
DP-FedAvg round (McMahan et al. 2018) with adaptive clipping (Andrew et al. 2021), federated
evaluation, and the sharding of clients over a device mesh.

The engine (`DpFedAvg`) takes any client update; `local_training` builds one from a loss.
`dpfed.federated.classifier` trains a classifier with it (experiments/fedavg_classifier.py).
"""

from dpfed.federated.aggregation import (
    AdaptiveClipping,
    PrivateAggregator,
    clip_update,
    update_noise_multiplier,
)
from dpfed.federated.client_data import (
    ClientData,
    OneClient,
    from_federated,
    gather_clients,
    local_batch_indices,
)
from dpfed.federated.dp_fedavg import (
    ClientUpdateFn,
    DpFedAvg,
    DpFedAvgConfig,
    RoundMetrics,
    ServerState,
)
from dpfed.federated.evaluation import (
    make_client_evaluator,
    make_example_evaluator,
    pack_clients,
    summarize,
)
from dpfed.federated.local import (
    ClientOutput,
    LocalState,
    init_local_states,
    local_training,
    masked_mean,
)
from dpfed.federated.loop import (
    OTHER_POPULATIONS,
    LoopResult,
    describe_user_level_privacy,
    round_key,
    run_rounds,
    write_privacy_summary,
)
from dpfed.federated.mesh import client_mesh, initialize_distributed, replicate
from dpfed.federated.sampling import CohortSampler, Subpopulation

__all__ = [
    "OTHER_POPULATIONS",
    "AdaptiveClipping",
    "ClientData",
    "ClientOutput",
    "ClientUpdateFn",
    "CohortSampler",
    "DpFedAvg",
    "DpFedAvgConfig",
    "LocalState",
    "LoopResult",
    "OneClient",
    "PrivateAggregator",
    "RoundMetrics",
    "ServerState",
    "Subpopulation",
    "client_mesh",
    "describe_user_level_privacy",
    "clip_update",
    "from_federated",
    "gather_clients",
    "init_local_states",
    "initialize_distributed",
    "local_batch_indices",
    "local_training",
    "make_client_evaluator",
    "make_example_evaluator",
    "pack_clients",
    "masked_mean",
    "replicate",
    "round_key",
    "run_rounds",
    "write_privacy_summary",
    "summarize",
    "update_noise_multiplier",
]
