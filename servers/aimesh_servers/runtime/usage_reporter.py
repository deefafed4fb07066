"""Sends the calls a model server ran to the mesh's usage collector, in batches.

`submit` runs on the event loop at the end of every call and only appends to a bounded
buffer; a background task sends what accumulated every `interval_s` (one ReportCalls
per batch). A drain flushes the buffer, so a clean shutdown loses nothing; a crash
loses at most the calls of the last interval. When the collector cannot be reached,
batches are kept (up to the bound) and retried; beyond it the oldest are dropped and
counted, because a model server must never stall on its accounting.
"""

from __future__ import annotations

import asyncio
import collections
import logging

import grpc
from aimesh.usage.v1 import usage_ingest_pb2 as ingest_pb
from aimesh.usage.v1 import usage_ingest_pb2_grpc as ingest_grpc
from aimesh.usage.v1 import usage_pb2
from google.protobuf import duration_pb2, timestamp_pb2

from .accounting import CallAccount
from .tls import CONTROL_SERVER_NAME, TlsFiles

log = logging.getLogger(__name__)


def to_record(account: CallAccount) -> usage_pb2.UsageRecord:
    service, _, method = account.method.strip("/").partition("/")
    record = usage_pb2.UsageRecord(
        request_id=account.request_id, tenant=account.tenant, service=service, method=method,
        requested_model=account.requested_model, served_model=account.served_model,
        served_version=account.served_version, pool=account.pool, unit=account.unit,
        input_units=account.input_units, output_units=account.output_units,
        status=account.status, reason=account.reason,
        origin="cache" if account.cache_hit else "server",
        time=timestamp_pb2.Timestamp(), duration=duration_pb2.Duration(),
    )
    record.time.FromNanoseconds(int(account.started_wall * 1e9))
    record.duration.FromNanoseconds(int(account.duration_s * 1e9))
    if account.first_output_s is not None:
        record.time_to_first_output.FromNanoseconds(int(account.first_output_s * 1e9))
    return record


class UsageReporter:
    def __init__(self, target: str, tls: TlsFiles | None = None, interval_s: float = 0.2,
                 max_buffer: int = 100_000, max_batch: int = 1000) -> None:
        self.target = target
        self.tls = tls  # mutual TLS to the control server (our own certificate and the mesh CA)
        self.interval_s = interval_s
        self.max_batch = max_batch
        self.buffer: collections.deque[usage_pb2.UsageRecord] = collections.deque(maxlen=max_buffer)
        self.dropped = 0
        self.sent = 0
        self._channel: grpc.aio.Channel | None = None
        self._task: asyncio.Task[None] | None = None

    def submit(self, account: CallAccount) -> None:
        if len(self.buffer) == self.buffer.maxlen:
            self.dropped += 1
        self.buffer.append(to_record(account))

    def start(self) -> None:
        self._connect()
        self._task = asyncio.create_task(self._run())

    def _connect(self) -> None:
        if self.tls is None:
            self._channel = grpc.aio.insecure_channel(self.target)
        else:
            self.tls.changed()  # the material this channel uses: a later change means a rotation
            self._channel = grpc.aio.secure_channel(
                self.target, self.tls.channel_credentials(),
                options=[("grpc.ssl_target_name_override", CONTROL_SERVER_NAME)])
        self._stub = ingest_grpc.UsageIngestServiceStub(self._channel)

    async def _reconnect_if_rotated(self) -> None:
        """A channel's credentials are fixed: after a rotation, new calls go on a new channel."""
        if self.tls is not None and self.tls.changed() is not None:
            old = self._channel
            self._connect()
            if old is not None:
                await old.close(grace=5)

    async def _send_some(self) -> bool:
        """Sends one batch; False when the collector did not take it (kept for later)."""
        batch = [self.buffer.popleft() for _ in range(min(self.max_batch, len(self.buffer)))]
        if not batch:
            return True
        await self._reconnect_if_rotated()
        try:
            await self._stub.ReportCalls(ingest_pb.ReportCallsRequest(records=batch), timeout=5)
        except grpc.aio.AioRpcError as exc:
            log.warning("usage collector %s unreachable (%s); keeping %d records",
                        self.target, exc.code().name, len(batch))
            self.buffer.extendleft(reversed(batch))
            return False
        self.sent += len(batch)
        return True

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            while self.buffer and await self._send_some():
                pass

    async def close(self, timeout_s: float = 5.0) -> None:
        """Flushes what is buffered (bounded by timeout_s), then closes the channel."""
        if self._task is None:
            return
        self._task.cancel()
        deadline = asyncio.get_running_loop().time() + timeout_s
        while self.buffer and asyncio.get_running_loop().time() < deadline:
            if not await self._send_some():
                await asyncio.sleep(0.1)
        if self.buffer:
            log.error("usage collector %s: %d records not delivered at shutdown",
                      self.target, len(self.buffer))
        if self._channel is not None:
            await self._channel.close()
