"""Block devices (SPDK-style bdevs): the contract is docs/bdev-interface.md.

`bdev.gpt` and `bdev.mbr` (pure partition-table parsers) are imported on their own, not re-exported.
"""

from ._base import CALLBACKS, Bdev, BdevDesc, BdevError, BdevEvent, FdSink, IoChannel, IoType
from .examine import PartitionExamine, partition_name, read_partition_table
from .malloc import MallocBdev
from .part import PartBdev
from .registry import BdevRegistry

__all__ = [
    "CALLBACKS",
    "Bdev",
    "BdevDesc",
    "BdevError",
    "BdevEvent",
    "BdevRegistry",
    "FdSink",
    "IoChannel",
    "IoType",
    "MallocBdev",
    "PartBdev",
    "PartitionExamine",
    "partition_name",
    "read_partition_table",
]
