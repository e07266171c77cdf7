"""Data: datasets by name, partitions among clients, feature-skew domains, FederatedData
(text: Shakespeare's speaking roles as clients, windows of their lines as samples)."""

import fedsim.data.leaf  # noqa: F401  (registers "femnist" in DATASETS)
import fedsim.data.shakespeare  # noqa: F401  (registers "shakespeare" and its federation)
from fedsim.data.datasets import (
    DATASETS,
    ArrayDataset,
    SyntheticDataset,
    load_dataset,
    read_cifar_batch,
    read_idx,
)
from fedsim.data.domains import DOMAINS, apply_domain, client_domain
from fedsim.data.federated import FederatedData, build_federated_data, check_data_config
from fedsim.data.partition import CLIENT_LABELS, PARTITIONS, split_clients
from fedsim.data.report import (
    PartitionReport,
    describe_partition,
    partition_table,
    plot_class_counts,
)

__all__ = [
    "CLIENT_LABELS",
    "DATASETS",
    "DOMAINS",
    "PARTITIONS",
    "ArrayDataset",
    "FederatedData",
    "PartitionReport",
    "SyntheticDataset",
    "apply_domain",
    "build_federated_data",
    "check_data_config",
    "client_domain",
    "describe_partition",
    "load_dataset",
    "partition_table",
    "plot_class_counts",
    "read_cifar_batch",
    "read_idx",
    "split_clients",
]
