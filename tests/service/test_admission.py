"""Admission over a real in-process gRPC server: the image server with the tiny
random-weight SD and one slot (batches of 1), whose slow generations hold the slot for as
long as a test needs.
Also the SDK's busy retries, which follow the server's RetryInfo."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable

import aimesh
import grpc
import pytest
from aimesh.image.v1 import image_generation_pb2 as pb
from aimesh.image.v1 import image_generation_pb2_grpc as pb_grpc
from aimesh_servers import image
from aimesh_servers.image.engine import ImageEngine
from aimesh_servers.image.servicer import ImageGenerationServicer
from aimesh_servers.runtime import accounting
from aimesh_servers.runtime.runner import ModelServer
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from tests.servers import in_process_server

MODEL = "tiny-sd"
QUICK = pb.GenerateImageRequest(model=MODEL, prompt="a boat", steps=1, seed=1)


@contextlib.asynccontextmanager
async def image_server(**settings: object) -> AsyncIterator[tuple[ModelServer, pb_grpc.ImageGenerationServiceStub]]:
    servicer = ImageGenerationServicer(image.DEFAULT_MODEL, ImageEngine("builtin:tiny-sd", max_batch=1),
                                       "local")
    async with in_process_server([servicer], **settings) as (server, channel):
        yield server, pb_grpc.ImageGenerationServiceStub(channel)


async def until(condition: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"never: {what}"
        await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def hog(stub: pb_grpc.ImageGenerationServiceStub, server: ModelServer) -> AsyncIterator[None]:
    """Holds the server's only slot (a generation far too long to finish) until the block ends."""
    call = stub.GenerateImage(pb.GenerateImageRequest(
        model=MODEL, prompt="a very slow one", width=256, height=256, steps=150), timeout=300)
    await asyncio.wait_for(call.read(), 60)  # first progress event: the slot is held
    try:
        yield
    finally:
        call.cancel()
        await until(lambda: server.limit.in_flight == 0, "the hog's slot came free")


async def measure_hold(stub, server: ModelServer, seconds: float) -> None:
    """Makes the server measure a slot held for `seconds` (its first measurement counts whole)."""
    async with hog(stub, server):
        await asyncio.sleep(seconds)
    assert server.limit.hold_s is not None and server.limit.hold_s >= seconds


def busy_details(error: grpc.aio.AioRpcError) -> tuple[error_details_pb2.ErrorInfo, float]:
    status = rpc_status.from_call(error)
    info, retry = error_details_pb2.ErrorInfo(), error_details_pb2.RetryInfo()
    assert status is not None
    for detail in status.details:
        if detail.Is(info.DESCRIPTOR):
            detail.Unpack(info)
        elif detail.Is(retry.DESCRIPTOR):
            detail.Unpack(retry)
    return info, retry.retry_delay.ToNanoseconds() / 1e9


async def test_a_call_over_capacity_waits_then_is_served_and_says_how_long():
    async with image_server(max_queue=4, queue_timeout_s=120) as (server, stub):
        assert server.limit.slots == 1  # the engine's capacity: its batch
        async with hog(stub, server):
            waiter = stub.GenerateImage(QUICK, timeout=120)
            await until(lambda: server.limit.waiting == 1, "the call queued")
        headers = dict(await asyncio.wait_for(waiter.initial_metadata(), 60))
        events = [e async for e in waiter]
    assert events[-1].HasField("result") and events[-1].result.served_by.model == MODEL
    assert headers["x-aimesh-queue-depth"] == "1" and int(headers["x-aimesh-queue-wait-ms"]) > 0
    assert headers["x-aimesh-served-model"] == MODEL  # one send: served-by and queue together
    assert server.limit.in_flight == 0 and server.limit.waiting == 0


async def test_an_unqueued_call_reports_no_wait():
    async with image_server() as (_, stub):
        call = stub.GenerateImage(QUICK, timeout=60)
        headers = dict(await call.initial_metadata())
        [e async for e in call]
    assert (headers["x-aimesh-queue-depth"], headers["x-aimesh-queue-wait-ms"]) == ("0", "0")


async def test_a_full_queue_refuses_at_once_with_retry_info():
    async with image_server(max_queue=1, queue_timeout_s=120) as (server, stub):
        async with hog(stub, server):
            waiter = stub.GenerateImage(QUICK, timeout=120)
            await until(lambda: server.limit.waiting == 1, "the call queued")
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                [e async for e in stub.GenerateImage(QUICK, timeout=120)]
            assert server.limit.waiting == 1, "the refused call took no place in the queue"
        assert [e async for e in waiter][-1].HasField("result")
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    info, retry_after = busy_details(caught.value)
    assert info.reason == "SERVER_BUSY" and info.domain == "aimesh.dev"
    assert info.metadata["max_queue"] == "1" and retry_after > 0
    assert server.limit.refused == 1


async def test_a_deadline_shorter_than_the_expected_wait_is_refused_at_once():
    async with image_server(max_queue=4, queue_timeout_s=120) as (server, stub):
        await measure_hold(stub, server, 3.0)  # a call holds the slot >= 3 s
        async with hog(stub, server):
            # Queueing would end in DEADLINE_EXCEEDED; refused, it can go elsewhere at once.
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                [e async for e in stub.GenerateImage(QUICK, timeout=2.0)]
            assert server.limit.waiting == 0
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    info, retry_after = busy_details(caught.value)
    assert info.reason == "SERVER_BUSY" and retry_after >= 2.25
    # The retry cannot fit the deadline either: gRPC clients are told not to retry.
    assert dict(caught.value.trailing_metadata())["grpc-retry-pushback-ms"] == "-1"


async def test_a_cancelled_waiter_frees_its_place_and_many_cancels_leak_nothing():
    async with image_server(max_queue=8, queue_timeout_s=120) as (server, stub):
        async with hog(stub, server):
            waiters = [stub.GenerateImage(QUICK, timeout=120) for _ in range(8)]
            await until(lambda: server.limit.waiting == 8, "8 calls queued")
            waiters[3].cancel()
            await until(lambda: server.limit.waiting == 7, "the cancelled caller left the queue")
            # Its place is free: one more caller queues instead of being refused.
            waiters.append(stub.GenerateImage(QUICK, timeout=120))
            await until(lambda: server.limit.waiting == 8, "a new caller took the place")
            for waiter in waiters:
                waiter.cancel()
            await until(lambda: server.limit.waiting == 0, "every cancelled caller left")
        assert server.limit.refused == 0
        # Slots cancelled while running are freed too.
        for _ in range(5):
            async with hog(stub, server):
                pass
        assert server.limit.in_flight == 0 and server.limit.waiting == 0
        assert [e async for e in stub.GenerateImage(QUICK, timeout=60)][-1].HasField("result")


async def test_every_admitted_call_is_accounted_once_with_its_final_status():
    ended: list[accounting.CallAccount] = []

    class Collect:
        def submit(self, account: accounting.CallAccount) -> None:
            ended.append(account)

    async with image_server(max_queue=0) as (server, stub):
        accounting.install_sink(Collect())
        try:
            [e async for e in stub.GenerateImage(QUICK, timeout=60)]
            with pytest.raises(grpc.aio.AioRpcError):
                [e async for e in stub.GenerateImage(pb.GenerateImageRequest(model=MODEL, prompt=""),
                                                     timeout=60)]
            async with hog(stub, server):
                with pytest.raises(grpc.aio.AioRpcError) as refused:  # never admitted: no account
                    [e async for e in stub.GenerateImage(QUICK, timeout=60)]
            await until(lambda: len(ended) == 3, "three accounts closed")
        finally:
            accounting.install_sink(None)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    ok, bad, cancelled = ended
    assert (ok.status, ok.unit, ok.output_units, ok.served_model) == ("OK", "image_steps", 1.0, MODEL)
    assert (bad.status, bad.reason) == ("INVALID_ARGUMENT", "INVALID_FIELD")
    assert cancelled.status == "CANCELLED"
    assert {a.method for a in ended} == {"/aimesh.image.v1.ImageGenerationService/GenerateImage"}


async def test_the_sdk_retries_a_busy_server_after_its_retry_info():
    async with image_server(max_queue=0) as (server, stub):
        # Slots measured to be held 4 s: RetryInfo says come back in 3-5 s (+-25% jitter).
        await measure_hold(stub, server, 4.0)
        target = f"127.0.0.1:{server.port}"

        # A deadline the delay cannot fit: refused once, no retry, RESOURCE_EXHAUSTED at once.
        async with aimesh.AsyncClient(target, timeout=2.0) as client, hog(stub, server):
            with pytest.raises(aimesh.ResourceExhaustedError) as caught:
                [e async for e in client.image.generate_image(MODEL, "a boat", steps=1)]
        assert caught.value.reason == "SERVER_BUSY" and caught.value.retry_after > 2.0
        assert server.limit.refused == 1

        async with aimesh.AsyncClient(target, timeout=60) as client:
            async def generate() -> list[pb.GenerateImageResponse]:
                return [e async for e in client.image.generate_image(MODEL, "a boat", steps=1)]

            async with hog(stub, server):
                call = asyncio.create_task(generate())
                await until(lambda: server.limit.refused == 2, "the first attempt was refused")
            events = await asyncio.wait_for(call, 60)  # the retry, seconds later, found the slot free
        assert events[-1].HasField("result") and server.limit.refused == 2

        # Opted out: the refusal comes back, with its RetryInfo.
        async with aimesh.AsyncClient(target, timeout=60, retry_busy=False) as client, hog(stub, server):
            with pytest.raises(aimesh.ResourceExhaustedError) as caught:
                [e async for e in client.image.generate_image(MODEL, "a boat", steps=1)]
        assert caught.value.reason == "SERVER_BUSY" and caught.value.retry_after > 0
        assert server.limit.refused == 3


def test_the_sdk_makes_at_most_two_attempts():
    with pytest.raises(ValueError, match="at most|to 2"):
        aimesh.Client("127.0.0.1:1", max_attempts=3)
