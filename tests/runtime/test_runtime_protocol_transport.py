"""Transport over real sockets on 127.0.0.1 (plaintext), socket options, and link-shaping arithmetic."""

from __future__ import annotations

import pytest
import torch
import zmq
from test_runtime_protocol import _payload, sample_messages
from zmq.utils.monitor import recv_monitor_message

from dist_llm_train.compression import build_codec, decode
from dist_llm_train.errors import ConfigError
from dist_llm_train.runtime.protocol import (
    ErrorReply,
    Heartbeat,
    Limits,
    Params,
    ProtocolError,
    Push,
    PushAck,
    Shutdown,
    decode_payload,
    encode_message,
)
from dist_llm_train.runtime.transport import (
    LinkShaper,
    dealer_recv,
    dealer_send,
    make_dealer,
    make_router,
    router_recv,
    router_send,
    socket_max_bytes,
)

LIMITS = Limits(max_frames=8, max_frame_bytes=64 * 1024, max_header_bytes=4096)
TIMEOUT_S = 5.0


def _pair(ctx: zmq.Context, routing_id: bytes = b"worker-0") -> tuple[zmq.Socket, zmq.Socket, str]:
    router = make_router(ctx, LIMITS, insecure=True)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    endpoint = f"tcp://127.0.0.1:{port}"
    dealer = make_dealer(ctx, LIMITS, insecure=True, routing_id=routing_id)
    dealer.connect(endpoint)
    return router, dealer, endpoint


def test_every_message_type_over_sockets(zmq_context: zmq.Context) -> None:
    router, dealer, _ = _pair(zmq_context)
    for msg in sample_messages():
        payload = _payload(msg)
        sent = dealer_send(dealer, msg, payload, limits=LIMITS)
        inbound = router_recv(router, LIMITS, timeout_s=TIMEOUT_S)
        assert inbound is not None
        assert inbound.message == msg
        assert inbound.nbytes == sent
        assert inbound.worker_id == "worker-0" and inbound.routing_id == b"worker-0"
        assert inbound.peer_key is None
        if msg.HAS_PAYLOAD:
            assert torch.equal(decode(decode_payload(inbound.frames)), decode(payload))
        # And back to the worker.
        back = router_send(router, inbound.routing_id, msg, payload)
        assert back == sent
        received = dealer_recv(dealer, LIMITS, timeout_s=TIMEOUT_S)
        assert received is not None and received.message == msg and received.nbytes == sent


def test_socket_options(zmq_context: zmq.Context) -> None:
    router, dealer, _ = _pair(zmq_context)
    for sock in (router, dealer):
        assert sock.getsockopt(zmq.LINGER) == 0
        assert sock.getsockopt(zmq.MAXMSGSIZE) == socket_max_bytes(LIMITS) > LIMITS.max_frame_bytes
    assert dealer.getsockopt(zmq.RECONNECT_IVL) == 100
    assert dealer.getsockopt(zmq.RECONNECT_IVL_MAX) == 5000
    assert dealer.getsockopt(zmq.ROUTING_ID) == b"worker-0"
    beating = make_dealer(zmq_context, LIMITS, insecure=True, heartbeat_ivl_s=1.0, heartbeat_timeout_s=3.0)
    assert beating.getsockopt(zmq.HEARTBEAT_IVL) == 1000
    assert beating.getsockopt(zmq.HEARTBEAT_TIMEOUT) == 3000
    assert make_dealer(zmq_context, LIMITS, insecure=True).getsockopt(zmq.ROUTING_ID) != b""


def test_plaintext_needs_explicit_insecure(zmq_context: zmq.Context) -> None:
    with pytest.raises(ConfigError, match="insecure=True"):
        make_router(zmq_context, LIMITS)
    with pytest.raises(ConfigError, match="insecure=True"):
        make_dealer(zmq_context, LIMITS)
    with pytest.raises(ConfigError, match="zero byte"):
        make_dealer(zmq_context, LIMITS, insecure=True, routing_id=b"\0abc")
    with pytest.raises(ConfigError, match="reconnect_ivl_max_s"):
        make_dealer(zmq_context, LIMITS, insecure=True, reconnect_ivl_s=2.0, reconnect_ivl_max_s=1.0)


def test_send_to_gone_peer_reports_instead_of_vanishing(zmq_context: zmq.Context) -> None:
    router, dealer, _ = _pair(zmq_context)
    assert router_send(router, b"nobody", Shutdown()) is None  # ROUTER_MANDATORY: EHOSTUNREACH
    dealer_send(dealer, Heartbeat())
    inbound = router_recv(router, LIMITS, timeout_s=TIMEOUT_S)
    assert inbound is not None
    assert router_send(router, inbound.routing_id, Shutdown()) is not None


def test_each_receive_gets_its_own_timeout(zmq_context: zmq.Context) -> None:
    # Receives wait inside libzmq (RCVTIMEO), which is socket state: a call must never inherit the
    # timeout of the call before it.
    router, dealer, _ = _pair(zmq_context)
    assert router_recv(router, LIMITS, timeout_s=0.01) is None  # nothing queued: runs out
    assert router.getsockopt(zmq.RCVTIMEO) == 10
    assert router_recv(router, LIMITS, timeout_s=0) is None  # non-blocking: leaves the option alone
    assert router.getsockopt(zmq.RCVTIMEO) == 10
    dealer_send(dealer, Heartbeat())
    inbound = router_recv(router, LIMITS)  # no timeout: blocks until the message is there
    assert inbound is not None and isinstance(inbound.message, Heartbeat)
    assert router.getsockopt(zmq.RCVTIMEO) == -1
    assert router_recv(router, LIMITS, timeout_s=0.02) is None
    assert router.getsockopt(zmq.RCVTIMEO) == 20


def test_handover_reconnect_keeps_identity(zmq_context: zmq.Context) -> None:
    router, first, endpoint = _pair(zmq_context, routing_id=b"worker-7")
    dealer_send(first, Heartbeat())
    assert router_recv(router, LIMITS, timeout_s=TIMEOUT_S) is not None
    # A restarted worker process reconnects under the same routing id before the old connection died.
    second = make_dealer(zmq_context, LIMITS, insecure=True, routing_id=b"worker-7")
    second.connect(endpoint)
    dealer_send(second, Heartbeat())
    inbound = router_recv(router, LIMITS, timeout_s=TIMEOUT_S)
    assert inbound is not None and inbound.worker_id == "worker-7"
    assert router_send(router, b"worker-7", Shutdown(reason="to the new connection")) is not None
    received = dealer_recv(second, LIMITS, timeout_s=TIMEOUT_S)
    assert received is not None and received.message == Shutdown(
        id=received.message.id, reason="to the new connection"
    )
    assert first.poll(0) == 0


def test_malformed_traffic_gets_an_error_reply_and_the_router_keeps_serving(zmq_context: zmq.Context) -> None:
    router, dealer, _ = _pair(zmq_context)
    raw = make_dealer(zmq_context, LIMITS, insecure=True, routing_id=b"attacker")
    raw.connect(router.getsockopt_string(zmq.LAST_ENDPOINT))
    push = Push(base_version=0, lease_id=1, task_id=1, tokens=1, loss=1.0)
    oversized = [
        encode_message(push, [b"\0" * (LIMITS.max_frame_bytes + 1)])[0],
        b"\0" * (LIMITS.max_frame_bytes + 1),
    ]
    cases = [
        ([b"random \xc1 bytes"], "malformed"),
        ([b"\x81\xa1v\x63"], "version"),  # {"v": 99}
        (oversized, "too-large"),
        ([encode_message(Heartbeat())[0], *([b"x"] * 9)], "too-many-frames"),
    ]
    for frames, code in cases:
        raw.send_multipart(frames, copy=False)
        with pytest.raises(ProtocolError) as info:
            router_recv(router, LIMITS, timeout_s=TIMEOUT_S)
        assert info.value.code == code
        assert info.value.routing_id == b"attacker" and info.value.worker_id == "attacker"
        assert router_send(router, info.value.routing_id, info.value.reply()) is not None
        reply = dealer_recv(raw, LIMITS, timeout_s=TIMEOUT_S)
        assert reply is not None and isinstance(reply.message, ErrorReply) and reply.message.code == code
    # The honest worker is still served.
    dealer_send(dealer, Heartbeat())
    inbound = router_recv(router, LIMITS, timeout_s=TIMEOUT_S)
    assert inbound is not None and inbound.worker_id == "worker-0"


def test_frame_above_the_socket_backstop_never_arrives(zmq_context: zmq.Context) -> None:
    router, dealer, _ = _pair(zmq_context)
    monitor = router.get_monitor_socket(zmq.EVENT_DISCONNECTED)
    raw = make_dealer(zmq_context, Limits(), insecure=True, routing_id=b"flooder")
    raw.connect(router.getsockopt_string(zmq.LAST_ENDPOINT))
    huge = b"\0" * (socket_max_bytes(LIMITS) + 1)
    raw.send_multipart([encode_message(Heartbeat())[0], huge], copy=False)
    # libzmq drops the flooder's connection (MAXMSGSIZE) ...
    assert monitor.poll(int(TIMEOUT_S * 1000)) != 0
    assert recv_monitor_message(monitor)["event"] == zmq.EVENT_DISCONNECTED
    # ... so nothing of its message reaches the protocol layer, and the honest worker is still served.
    assert router_recv(router, LIMITS, timeout_s=0) is None
    dealer_send(dealer, Heartbeat())
    inbound = router_recv(router, LIMITS, timeout_s=TIMEOUT_S)
    assert inbound is not None and inbound.worker_id == "worker-0"
    router.disable_monitor()


# ---------------------------------------------------------------------- link shaping
class FakeTime:
    """A clock that only moves when slept on (or told to), recording every sleep."""

    def __init__(self, advance: bool = True) -> None:
        self.now = 100.0
        self.sleeps: list[float] = []
        self.advance = advance

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        if self.advance:
            self.now += seconds


def test_shaper_delay_is_latency_plus_transfer() -> None:
    fake = FakeTime()
    shaper = LinkShaper(bandwidth_mbps=8.0, latency_ms=50.0, sleep=fake.sleep, clock=fake.clock)
    assert shaper.transfer_s(1_000_000) == pytest.approx(1.0)  # 8 Mbit at 8 Mbit/s
    assert shaper.delay_s(1_000_000) == pytest.approx(1.05)
    assert shaper.before_send(1_000_000) == pytest.approx(1.05)
    assert shaper.before_send(250_000) == pytest.approx(0.30)
    assert shaper.after_recv(500_000) == pytest.approx(0.55)
    assert fake.sleeps == pytest.approx([1.05, 0.30, 0.55])
    assert shaper.bytes == {"up": 1_250_000, "down": 500_000}
    assert shaper.slept_s == pytest.approx(1.9)


def test_shaper_serialises_concurrent_sends_per_direction() -> None:
    # Time does not move while sleeping: as if two threads sent at the same instant.
    fake = FakeTime(advance=False)
    shaper = LinkShaper(bandwidth_mbps=80.0, latency_ms=10.0, sleep=fake.sleep, clock=fake.clock)
    assert shaper.before_send(1_000_000) == pytest.approx(0.11)  # 0.1 s on the link + 10 ms
    assert shaper.before_send(1_000_000) == pytest.approx(0.21)  # waits for the first upload
    assert shaper.after_recv(1_000_000) == pytest.approx(0.11)  # the download direction is free
    fake.now += 10.0  # the link drains while idle
    assert shaper.before_send(1_000_000) == pytest.approx(0.11)


def test_shaper_pipelined_messages_share_the_latency() -> None:
    fake = FakeTime()
    shaper = LinkShaper(bandwidth_mbps=8.0, latency_ms=50.0, sleep=fake.sleep, clock=fake.clock)
    # A push and the task request right behind it: one latency, both transfers.
    assert shaper.before_send(100_000) == pytest.approx(0.15)
    assert shaper.before_send(1_000, with_previous=True) == pytest.approx(0.001)
    # The replies to both: acknowledgement, assignment and parameters arrive in one burst.
    assert shaper.after_recv(1_000) == pytest.approx(0.051)
    assert shaper.after_recv(1_000, with_previous=True) == pytest.approx(0.001)
    assert shaper.after_recv(500_000, with_previous=True) == pytest.approx(0.5)
    assert sum(fake.sleeps) == pytest.approx(0.703)  # 2 latencies; one at a time would cost 5
    # Sent one after the other (the old request/reply sequence), each message pays the latency again.
    serial = LinkShaper(bandwidth_mbps=8.0, latency_ms=50.0, sleep=fake.sleep, clock=fake.clock)
    assert serial.before_send(100_000) + serial.before_send(1_000) == pytest.approx(0.201)


def test_shaper_unlimited_and_validation() -> None:
    fake = FakeTime()
    latency_only = LinkShaper(latency_ms=20.0, sleep=fake.sleep, clock=fake.clock)
    assert latency_only.before_send(10**9) == pytest.approx(0.02)
    free = LinkShaper(sleep=fake.sleep, clock=fake.clock)
    assert free.before_send(10**9) == 0.0
    assert fake.sleeps == pytest.approx([0.02])  # no sleep call at all for a free link
    for bad in ({"bandwidth_mbps": 0.0}, {"bandwidth_mbps": float("inf")}, {"latency_ms": -1.0}):
        with pytest.raises(ConfigError):
            LinkShaper(**bad)


def test_shaper_charges_the_exact_wire_bytes(zmq_context: zmq.Context) -> None:
    router, dealer, _ = _pair(zmq_context)
    fake = FakeTime()
    shaper = LinkShaper(bandwidth_mbps=1.0, latency_ms=5.0, sleep=fake.sleep, clock=fake.clock)
    payload = build_codec("none").encode(torch.ones(1000))
    sent = dealer_send(dealer, Params(version=1, numel=1000), payload, shaper=shaper, limits=LIMITS)
    assert sent is not None and sent > 4000
    assert fake.sleeps == pytest.approx([0.005 + sent * 8 / 1e6])
    inbound = router_recv(router, LIMITS, timeout_s=TIMEOUT_S)
    assert inbound is not None
    router_send(router, inbound.routing_id, PushAck(accepted=True, staleness=0, version=2))
    received = dealer_recv(dealer, LIMITS, timeout_s=TIMEOUT_S, shaper=shaper)
    assert received is not None
    assert fake.sleeps[1] == pytest.approx(0.005 + received.nbytes * 8 / 1e6)
    assert shaper.bytes == {"up": sent, "down": received.nbytes}
