"""The FileDescriptorSet Envoy's gRPC-JSON transcoder needs, built from the generated
modules the SDK ships (they embed each .proto's descriptor, google.api.http options
included), so no protoc or buf is needed at run time."""

from __future__ import annotations

import importlib
import pkgutil

import aimesh
from google.protobuf import descriptor_pb2
from google.protobuf.descriptor import FileDescriptor
from google.rpc import error_details_pb2, status_pb2


def aimesh_files() -> list[FileDescriptor]:
    """Every generated aimesh .proto file descriptor (imports all `*_pb2` modules)."""
    files = []
    for info in pkgutil.walk_packages(aimesh.__path__, "aimesh."):
        if info.name.endswith("_pb2"):
            files.append(importlib.import_module(info.name).DESCRIPTOR)
    return files


def service_names() -> list[str]:
    return sorted(s.full_name for f in aimesh_files() for s in f.services_by_name.values())


def descriptor_set() -> bytes:
    """All aimesh files and their imports, dependencies first."""
    out = descriptor_pb2.FileDescriptorSet()
    seen: set[str] = set()

    def add(file: FileDescriptor) -> None:
        if file.name in seen:
            return
        seen.add(file.name)
        for dep in file.dependencies:
            add(dep)
        file.CopyToProto(out.file.add())

    # google.rpc types let the transcoder render error details (ErrorInfo...) as JSON.
    for file in [*aimesh_files(), status_pb2.DESCRIPTOR, error_details_pb2.DESCRIPTOR]:
        add(file)
    return out.SerializeToString()
