"""Emulated multi-node clusters on one machine (`linscale cluster`): see `linscale.cluster.netns`."""

from linscale.cluster.netns import Cluster, ClusterError, down, parse_latency, parse_loss, parse_rate

__all__ = ["Cluster", "ClusterError", "down", "parse_latency", "parse_loss", "parse_rate"]
