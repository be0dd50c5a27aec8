"""Memory accounting for one training step: what autograd saves, per operator and module, peak.

>>> from s2a.memory import measure
>>> report = measure(model, batch)        # doctest: +SKIP
>>> print(report)                          # doctest: +SKIP
"""

from s2a.memory.allocator import host_live_bytes, probe_for
from s2a.memory.kinds import kind_from_class_name, node_kind
from s2a.memory.measure import default_loss, measure, storage_key
from s2a.memory.report import MemoryReport, compare_table, format_bytes, format_count

__all__ = [
    "MemoryReport",
    "compare_table",
    "default_loss",
    "format_bytes",
    "format_count",
    "host_live_bytes",
    "kind_from_class_name",
    "measure",
    "node_kind",
    "probe_for",
    "storage_key",
]
