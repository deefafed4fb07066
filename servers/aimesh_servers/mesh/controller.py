"""Turns discovery (who is registered) into Envoy endpoints, without restarting Envoy.

Each model cluster reads an EDS file; the controller rewrites it whenever the set of
registered servers of that model changes. Pools map to priority levels in the order
the registry lists them (the fallback chain). Files are replaced atomically (write
then rename): Envoy ignores in-place writes and reloads on a move into the watched
folder.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from ..registry.discovery import Discovery, Instance
from ..registry.schema import Model, Registry
from .envoy_config import MeshSpec

log = logging.getLogger(__name__)


def load_assignment(model: Model, instances: Iterable[Instance]) -> dict[str, Any]:
    mine = [i for i in instances if i.model == model.id]
    # One priority level per pool, always (empty when the pool has no server): a server
    # never moves between levels as others come and go, so Envoy's view stays stable.
    endpoints = [{
        "priority": priority,
        "locality": {"zone": pool.id},
        "lb_endpoints": [{"endpoint": {"address": {"socket_address": {
            "address": i.address, "port_value": i.port}}}}
            for i in sorted(i for i in mine if i.pool == pool.id)],
    } for priority, pool in enumerate(model.pools)]
    return {
        "resources": [{
            "@type": "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment",
            "cluster_name": model.cluster,
            "endpoints": endpoints,
            # A chain falls back only when a pool has no healthy server, not when a few of
            # its servers are down (Envoy's default factor 1.4 would spill load early).
            "policy": {"overprovisioning_factor": 100_000},
        }]
    }


def write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


class EndpointController:
    def __init__(self, spec: MeshSpec, registry: Registry) -> None:
        self.spec = spec
        self.registry = registry
        self.current: dict[str, str] = {}
        self.instances: list[Instance] = []

    def apply(self, instances: list[Instance]) -> list[str]:
        """Writes the EDS files whose content changed; returns the clusters updated."""
        self.instances = instances
        changed = []
        for model in self.registry.models:
            text = yaml.safe_dump(load_assignment(model, instances), sort_keys=False)
            if self.current.get(model.cluster) != text:
                write_atomically(self.spec.eds_path(model), text)
                self.current[model.cluster] = text
                changed.append(model.cluster)
        return changed

    async def run(self, discovery: Discovery) -> None:
        async for instances in discovery.watch():
            for cluster in self.apply(instances):
                log.info("endpoints of %s updated: %d registered", cluster,
                         sum(1 for i in instances if f"model_{i.model}" == cluster))
