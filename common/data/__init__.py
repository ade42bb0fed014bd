"""Private text data: loading and validation, client partitions, and the offline demo corpus."""

from common.data.generate import CANARY_TEMPLATE, generate_corpus
from common.data.loading import FORMATS, Record, load_records, summarize
from common.data.partition import partition_dirichlet, partition_iid

__all__ = [
    "CANARY_TEMPLATE",
    "FORMATS",
    "Record",
    "generate_corpus",
    "load_records",
    "partition_dirichlet",
    "partition_iid",
    "summarize",
]
