"""A gpt task that records the device mesh each rank trains on (for tests/cluster/test_hsdp.py).

linscale does not expose the mesh, but under the sharded strategies the parameters the loss
sees are FSDP2 DTensors, which carry it. On its first call `loss` writes what this rank sees
to $LINSCALE_TEST_OUT/mesh-rank<R>.json; training is the built-in gpt task's, unchanged."""

import json
import os
import socket
from pathlib import Path

import torch.distributed as dist

from linscale.tasks.gpt import GPTTask


def mesh_view(model) -> dict:
    """The mesh, its dimension names, the process groups along each dimension and the placements of
    every parameter, as this rank sees them (plain lists and strings, for JSON)."""
    params = dict(model.named_parameters())
    meshes = {id(p.device_mesh) for p in params.values() if hasattr(p, "device_mesh")}
    view: dict = {"dtensor_params": sum(hasattr(p, "device_mesh") for p in params.values()), "params": len(params)}
    if not meshes:
        return view
    mesh = next(p.device_mesh for p in params.values() if hasattr(p, "device_mesh"))
    view.update(
        meshes=len(meshes),
        mesh=mesh.mesh.tolist(),
        dim_names=list(mesh.mesh_dim_names or ()),
        # The ranks of this rank's group along each dimension: who it shards with, who it replicates with.
        groups={name: dist.get_process_group_ranks(mesh.get_group(name)) for name in mesh.mesh_dim_names or ()},
        placements=sorted({repr(tuple(p.placements)) for p in params.values() if hasattr(p, "placements")}),
    )
    return view


class MeshRecorder(GPTTask):
    def __init__(self, config=None) -> None:
        super().__init__(config)
        self._recorded = False

    def loss(self, model, batch):
        if not self._recorded:
            self._recorded = True
            rank = int(os.environ.get("RANK", "0"))
            record = {
                "rank": rank,
                "local_rank": int(os.environ.get("LOCAL_RANK", "0")),
                "group_rank": int(os.environ.get("GROUP_RANK", "-1")),  # the node, as the elastic agent numbers it
                "node": int(os.environ.get("LINSCALE_NODE_RANK", "-1")),  # the emulated node the process runs in
                "node_addr": os.environ.get("LINSCALE_NODE_ADDR", ""),
                "hostname": socket.gethostname(),
                # net:[inode]: the network namespace this process runs in (/run/netns/<name> has the same inode).
                "netns": os.readlink("/proc/self/ns/net"),
                **mesh_view(model),
            }
            out = Path(os.environ["LINSCALE_TEST_OUT"]) / f"mesh-rank{rank}.json"
            out.write_text(json.dumps(record, indent=1))
        return super().loss(model, batch)
