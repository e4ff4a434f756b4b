"""linscale: data-parallel training from one process to many nodes, with one command."""

__version__ = "0.1.0"

from linscale.task import DataShard, Task  # noqa: E402

__all__ = ["DataShard", "Task", "__version__"]
