"""Datasets of dpfed: image registry, Shakespeare clients, partitions, text vocabulary.

- `load(name, split)` -> `ImageDataset` (float32 `[N, H, W, C]` in [0, 1], int32 labels);
  `list_datasets()` names every dataset. Embedded (offline) ones: `mnist5k`, `digits`;
  `source_flag(name)` names the flag that chooses a dataset's data.
- `load_shakespeare()` -> `ShakespeareData`: one client per (play, speaker name), as LEAF.
- `partition_iid` / `partition_dirichlet` / `partition_dirichlet_mix` /
  `partition_natural` split examples over clients; `to_federated` pads them into
  `FederatedData` arrays for on-device use.
- `dpfed.data.text`: tokenizers, `Vocabulary`, padded client sequences for LMs.
"""

from dpfed.data.dataset import DatasetUnavailableError, ImageDataset, UnknownDatasetError
from dpfed.data.partition import (
    FederatedData,
    partition_dirichlet,
    partition_dirichlet_mix,
    partition_iid,
    partition_natural,
    to_federated,
)
from dpfed.data.registry import list_datasets, load, source_flag
from dpfed.data.shakespeare import ShakespeareData, load_shakespeare

__all__ = [
    "DatasetUnavailableError",
    "FederatedData",
    "ImageDataset",
    "ShakespeareData",
    "UnknownDatasetError",
    "list_datasets",
    "load",
    "load_shakespeare",
    "partition_dirichlet",
    "partition_dirichlet_mix",
    "partition_iid",
    "partition_natural",
    "source_flag",
    "to_federated",
]
