"""CurveZMQ: key files, the allow-list, User-Id, and identities bound to keys (real sockets on 127.0.0.1)."""

from __future__ import annotations

import os
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch
import zmq
from zmq.utils.monitor import recv_monitor_message

from dist_llm_train.cli import main
from dist_llm_train.compression import build_codec, decode
from dist_llm_train.errors import ConfigError, PreconditionError
from dist_llm_train.runtime.protocol import (
    PIECE_BYTES,
    Heartbeat,
    Limits,
    Params,
    ProtocolError,
    Push,
    Register,
    Shutdown,
    decode_payload,
)
from dist_llm_train.runtime.security import (
    CurveClient,
    CurveServer,
    KeyPair,
    generate_keys,
    load_keypair,
    load_public_key,
    peer_identity,
    worker_id_from_key,
)
from dist_llm_train.runtime.transport import (
    dealer_recv,
    dealer_send,
    make_dealer,
    make_router,
    router_recv,
    router_send,
    splits_payloads,
)

if TYPE_CHECKING:  # the fixture's type; conftest modules are not imported by name
    from conftest import KeySet

LIMITS = Limits(max_frames=8, max_frame_bytes=64 * 1024, max_header_bytes=4096)
TIMEOUT_S = 5.0


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# ---------------------------------------------------------------------- key files
def test_generate_keys_permissions_and_loading(tmp_path: Path) -> None:
    directory = tmp_path / "new" / "keys"
    public, secret = generate_keys(directory, "worker-5")
    assert (public, secret) == (directory / "worker-5.key", directory / "worker-5.key_secret")
    assert _mode(directory) == 0o700
    assert _mode(secret) == 0o600
    assert _mode(public) == 0o644
    assert sorted(p.name for p in directory.iterdir()) == ["worker-5.key", "worker-5.key_secret"]
    pair = load_keypair(secret)
    assert pair.public == load_public_key(public) and len(pair.public) == 40
    assert pair.secret is not None and zmq.curve_public(pair.secret) == pair.public
    assert load_keypair(public) == pair == load_keypair(directory / "worker-5")
    assert pair.secret.decode() not in repr(pair) and pair.secret.decode() not in str(pair)
    assert pair.worker_id == worker_id_from_key(pair.public) == worker_id_from_key(pair.public.decode())
    assert pair.worker_id.startswith("w-") and len(pair.worker_id) == 34


def test_generate_keys_refuses_overwrite_and_bad_names(tmp_path: Path) -> None:
    public, _ = generate_keys(tmp_path, "controller")
    before = load_public_key(public)
    with pytest.raises(ConfigError, match="already exist"):
        generate_keys(tmp_path, "controller")
    generate_keys(tmp_path, "controller", overwrite=True)
    assert load_public_key(public) != before
    for bad in ("../escape", "", "a/b", ".hidden", "x" * 65):
        with pytest.raises(ConfigError, match="key name"):
            generate_keys(tmp_path, bad)
    assert not any(p.name.startswith(".keygen") for p in tmp_path.iterdir())


def test_load_keypair_refusals(tmp_path: Path) -> None:
    public, secret = generate_keys(tmp_path, "w")
    with pytest.raises(ConfigError, match="not found"):
        load_keypair(tmp_path / "missing.key_secret")
    os.chmod(secret, 0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        load_keypair(secret)
    os.chmod(secret, 0o600)
    # A secret file whose public key was swapped for another one.
    other_public, _ = generate_keys(tmp_path, "other")
    text = secret.read_text().replace(
        load_public_key(public).decode(), load_public_key(other_public).decode()
    )
    secret.write_text(text)
    with pytest.raises(ConfigError, match="does not belong"):
        load_keypair(secret)
    garbage = tmp_path / "garbage.key"
    garbage.write_text("not a certificate\n")
    with pytest.raises(ConfigError):
        load_public_key(garbage)
    with pytest.raises(ConfigError, match="no secret key"):
        shutil.copy(other_public, tmp_path / "pub-only.key_secret")
        os.chmod(tmp_path / "pub-only.key_secret", 0o600)
        load_keypair(tmp_path / "pub-only.key_secret")


def test_keys_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    directory = tmp_path / "keys"
    assert main(["keys", "generate", str(directory), "--name", "worker-2"]) == 0
    out = capsys.readouterr().out
    secret = directory / "worker-2.key_secret"
    assert _mode(directory) == 0o700 and _mode(secret) == 0o600 and _mode(directory / "worker-2.key") == 0o644
    worker_id = load_keypair(secret).worker_id
    assert worker_id in out and "allow-list" in out
    assert main(["keys", "generate", str(directory), "--name", "worker-2"]) == 2
    assert "already exist" in capsys.readouterr().err
    assert main(["keys", "generate", str(directory), "--name", "a/b"]) == 2
    assert main(["keys", "list", str(directory)]) == 0
    assert worker_id in capsys.readouterr().out
    assert main(["keys", "list", str(tmp_path / "nowhere")]) == 2
    assert "not found" in capsys.readouterr().err


# ---------------------------------------------------------------------- identities
def test_peer_identity() -> None:
    key = "rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yf7"
    assert peer_identity(b"any-routing-id", key, secure=True) == worker_id_from_key(key)
    with pytest.raises(ProtocolError) as info:
        peer_identity(b"worker-0", None, secure=True)
    assert info.value.code == "identity"
    assert peer_identity(b"worker-0", None, secure=False) == "worker-0"
    assert peer_identity(b"\x00\x80\x00\x00\x29", None, secure=False) == "0x0080000029"
    assert peer_identity(b"0x41", None, secure=False) == "0x" + b"0x41".hex()  # no collision with hex ids
    assert peer_identity(b"\xff\xfe", None, secure=False) == "0xfffe"


# ---------------------------------------------------------------------- sockets
@pytest.fixture()
def server(zmq_context: zmq.Context, key_set: KeySet) -> Iterator[CurveServer]:
    curve = CurveServer(zmq_context, load_keypair(key_set.secret("controller")), key_set.allow_dir)
    with curve:
        yield curve
    assert not curve.running


def _router(ctx: zmq.Context, curve: CurveServer) -> tuple[zmq.Socket, str]:
    router = make_router(ctx, LIMITS, curve=curve)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    return router, f"tcp://127.0.0.1:{port}"


def _worker(
    ctx: zmq.Context, key_set: KeySet, name: str, endpoint: str, routing_id: bytes | None = None
) -> tuple[zmq.Socket, CurveClient]:
    client = CurveClient(load_keypair(key_set.secret(name)), load_public_key(key_set.public("controller")))
    dealer = make_dealer(ctx, LIMITS, curve=client, routing_id=routing_id)
    dealer.connect(endpoint)
    return dealer, client


def test_allow_listed_worker_exchanges_messages(
    zmq_context: zmq.Context, key_set: KeySet, server: CurveServer
) -> None:
    router, endpoint = _router(zmq_context, server)
    assert len(server.allowed_keys) == 2
    dealer, client = _worker(zmq_context, key_set, "worker-0", endpoint)
    dealer_send(dealer, Register(name="worker-0", device="cpu"))
    inbound = router_recv(router, LIMITS, timeout_s=TIMEOUT_S)
    assert inbound is not None
    # The ZAP User-Id is the worker's z85 public key; the identity is derived from it.
    assert inbound.peer_key == client.keypair.public.decode()
    assert inbound.worker_id == client.worker_id == worker_id_from_key(client.keypair.public)
    assert router_send(router, inbound.routing_id, Shutdown(ref=inbound.message.id)) is not None
    reply = dealer_recv(dealer, LIMITS, timeout_s=TIMEOUT_S)
    assert (
        reply is not None and isinstance(reply.message, Shutdown) and reply.message.ref == inbound.message.id
    )


def test_large_payloads_cross_an_encrypted_link_in_pieces(
    zmq_context: zmq.Context, key_set: KeySet, server: CurveServer
) -> None:
    # 3 MB of parameters each way: split into 512 KiB pieces (encryption and transfer overlap), joined
    # intact on the other side; the byte counts are the wire's, header included.
    limits = Limits.for_params(800_000)
    router = make_router(zmq_context, limits, curve=server)
    endpoint = f"tcp://127.0.0.1:{router.bind_to_random_port('tcp://127.0.0.1')}"
    client = CurveClient(
        load_keypair(key_set.secret("worker-0")), load_public_key(key_set.public("controller"))
    )
    dealer = make_dealer(zmq_context, limits, curve=client)
    dealer.connect(endpoint)
    assert splits_payloads(router) and splits_payloads(dealer)
    params = torch.randn(800_000, generator=torch.Generator().manual_seed(0))
    payload = build_codec("none").encode(params)
    push = Push(base_version=0, lease_id=1, task_id=1, tokens=1, loss=1.0)
    sent = dealer_send(dealer, push, payload, limits=limits)
    inbound = router_recv(router, limits, timeout_s=TIMEOUT_S)
    assert inbound is not None and inbound.message == push and inbound.nbytes == sent
    assert torch.equal(decode(decode_payload(inbound.frames)), params)
    reply = Params(ref=push.id, version=1, numel=800_000)
    back = router_send(router, inbound.routing_id, reply, payload, limits=limits)
    received = dealer_recv(dealer, limits, timeout_s=TIMEOUT_S)
    assert received is not None and received.message == reply and received.nbytes == back
    assert torch.equal(decode(decode_payload(received.frames)), params)
    assert back is not None and back > 4 * 800_000 > PIECE_BYTES * 6


def test_worker_not_on_allow_list_is_refused(
    zmq_context: zmq.Context, key_set: KeySet, server: CurveServer
) -> None:
    router, endpoint = _router(zmq_context, server)
    client = CurveClient(
        load_keypair(key_set.secret("worker-2")), load_public_key(key_set.public("controller"))
    )
    dealer = make_dealer(zmq_context, LIMITS, curve=client)
    monitor = dealer.get_monitor_socket(zmq.EVENT_HANDSHAKE_FAILED_AUTH)
    dealer.connect(endpoint)
    dealer_send(dealer, Register(name="worker-2", device="cpu"))
    # The controller's ZAP handler refused the key (the worker learns it as an auth failure) ...
    assert monitor.poll(int(TIMEOUT_S * 1000)) != 0
    assert recv_monitor_message(monitor)["event"] == zmq.EVENT_HANDSHAKE_FAILED_AUTH
    dealer.disable_monitor()
    # ... and its message never arrives, while an allowed worker still gets through.
    assert router_recv(router, LIMITS, timeout_s=0.2) is None
    allowed, _ = _worker(zmq_context, key_set, "worker-1", endpoint)
    dealer_send(allowed, Heartbeat())
    inbound = router_recv(router, LIMITS, timeout_s=TIMEOUT_S)
    assert inbound is not None and inbound.worker_id == load_keypair(key_set.secret("worker-1")).worker_id
    assert router_recv(router, LIMITS, timeout_s=0.2) is None


def test_plaintext_worker_cannot_reach_a_curve_controller(
    zmq_context: zmq.Context, key_set: KeySet, server: CurveServer
) -> None:
    router, endpoint = _router(zmq_context, server)
    plain = make_dealer(zmq_context, LIMITS, insecure=True, routing_id=b"worker-0")
    monitor = router.get_monitor_socket(
        zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
    )
    plain.connect(endpoint)
    dealer_send(plain, Heartbeat())
    assert monitor.poll(int(TIMEOUT_S * 1000)) != 0
    router.disable_monitor()
    assert router_recv(router, LIMITS, timeout_s=0.2) is None


def test_worker_cannot_impersonate_another(
    zmq_context: zmq.Context, key_set: KeySet, server: CurveServer
) -> None:
    router, endpoint = _router(zmq_context, server)
    honest, honest_client = _worker(zmq_context, key_set, "worker-0", endpoint, routing_id=b"shared-rid")
    dealer_send(honest, Register(name="worker-0", device="cpu"))
    first = router_recv(router, LIMITS, timeout_s=TIMEOUT_S)
    assert first is not None and first.worker_id == honest_client.worker_id
    # worker-1 copies worker-0's routing id and claims its name: the identity still comes from its own key.
    mallory, mallory_client = _worker(zmq_context, key_set, "worker-1", endpoint, routing_id=b"shared-rid")
    dealer_send(mallory, Register(name="worker-0", device="cpu"))
    dealer_send(mallory, Heartbeat(lease_ids=[1]))
    for _ in range(2):
        inbound = router_recv(router, LIMITS, timeout_s=TIMEOUT_S)
        assert inbound is not None
        assert inbound.routing_id == b"shared-rid"
        assert inbound.peer_key == mallory_client.keypair.public.decode()
        assert inbound.worker_id == mallory_client.worker_id != honest_client.worker_id


def test_curve_socket_without_authenticator_is_not_trusted(zmq_context: zmq.Context, key_set: KeySet) -> None:
    controller = load_keypair(key_set.secret("controller"))
    curve = CurveServer(zmq_context, controller, key_set.allow_dir)
    with pytest.raises(PreconditionError, match="start"):
        make_router(zmq_context, LIMITS, curve=curve)
    # Built by hand without ZAP, libzmq admits any key and stamps no User-Id: the transport refuses it.
    router = make_router(zmq_context, LIMITS, insecure=True)
    router.curve_secretkey, router.curve_publickey, router.curve_server = (
        controller.secret,
        controller.public,
        True,
    )
    port = router.bind_to_random_port("tcp://127.0.0.1")
    dealer, _ = _worker(zmq_context, key_set, "worker-2", f"tcp://127.0.0.1:{port}")
    dealer_send(dealer, Heartbeat())
    with pytest.raises(ProtocolError) as info:
        router_recv(router, LIMITS, timeout_s=TIMEOUT_S)
    assert info.value.code == "identity" and info.value.routing_id is not None


def test_allow_list_errors_and_reload(zmq_context: zmq.Context, key_set: KeySet, tmp_path: Path) -> None:
    controller = load_keypair(key_set.secret("controller"))
    with pytest.raises(ConfigError, match="not found"):
        CurveServer(zmq_context, controller, tmp_path / "missing").start()
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match="no public"):
        CurveServer(zmq_context, controller, empty).start()
    with pytest.raises(ConfigError, match="secret"):
        CurveServer(zmq_context, KeyPair(controller.public), empty)
    allow = tmp_path / "allow"
    allow.mkdir()
    shutil.copy(key_set.public("worker-0"), allow)
    with CurveServer(zmq_context, controller, allow) as curve:
        router, endpoint = _router(zmq_context, curve)
        shutil.copy(key_set.public("worker-2"), allow)
        assert curve.reload() == 2
        dealer, client = _worker(zmq_context, key_set, "worker-2", endpoint)
        dealer_send(dealer, Heartbeat())
        inbound = router_recv(router, LIMITS, timeout_s=TIMEOUT_S)
        assert inbound is not None and inbound.worker_id == client.worker_id
    with pytest.raises(PreconditionError):
        curve.reload()
