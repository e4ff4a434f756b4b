"""linscale: data-parallel training from one process to many nodes, with one command."""

__version__ = "0.1.0"

__all__ = ["DataShard", "Task", "__version__"]


def __getattr__(name: str):
    # Lazy, so that `linscale` the command can set up the environment before torch loads.
    if name in ("Task", "DataShard"):
        from linscale import task

        return getattr(task, name)
    raise AttributeError(f"module 'linscale' has no attribute {name!r}")
