"""Emulated-cluster tests: they create network namespaces, so they need root and iproute2.

Every cluster made here gets a unique name and subnet, its state in a temporary directory, and
is always removed again, also when a test fails."""

from __future__ import annotations

import os
import random
import shutil
import uuid

import pytest


def pytest_configure(config):
    config.addinivalue_line("markers", "cluster: tests that create network namespaces (need root and iproute2)")


def skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root: linscale cluster creates network namespaces"
    missing = [tool for tool in ("ip", "tc", "bridge") if not shutil.which(tool, path="/usr/sbin:/sbin:/usr/bin:/bin")]
    if missing:
        return f"needs iproute2 ({', '.join(missing)} not found)"
    return None


@pytest.fixture(scope="session")
def cluster_state_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cluster-state")


@pytest.fixture(scope="session")
def make_cluster(cluster_state_dir):
    """`make_cluster(nodes, link, **kw)` brings up a cluster with a unique name and subnet; every
    cluster is removed at the end of the session, and no namespace of theirs may remain."""
    from linscale.cluster.netns import Cluster, down, list_netns

    prefix = f"lt{uuid.uuid4().hex[:4]}"
    made: list[str] = []
    third_octets = random.sample(range(100, 250), 50)

    def new_name() -> str:
        """A unique cluster name, removed at the end like the clusters made here."""
        made.append(f"{prefix}{len(made)}")
        return made[-1]

    def make(nodes: int, link: str, **kw) -> Cluster:
        name = new_name()
        subnet = kw.pop("subnet", f"10.213.{third_octets[len(made)]}.0/24")
        return Cluster.up(nodes, link, name=name, subnet=subnet, directory=cluster_state_dir, **kw)

    make.prefix = prefix
    make.new_name = new_name
    try:
        yield make
    finally:
        errors = []
        for name in made:
            try:
                down(name, cluster_state_dir)
            except Exception as e:  # noqa: BLE001 - try every cluster, report all
                errors.append(f"{name}: {e}")
        left = [ns for ns in list_netns() if ns.startswith(prefix)]
        assert not left, f"namespaces left behind: {left}"
        assert not errors, errors
