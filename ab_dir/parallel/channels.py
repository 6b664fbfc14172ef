"""ZeroMQ channels between the scheduler process and the workers.

One ROUTER socket on the engine side, one DEALER per worker. A worker connects and says ``Hello``; from then
on the engine addresses it by rank. ROUTER/DEALER (rather than PUB/SUB) means no slow-joiner losses, one
port for both directions, and a clear error (``ROUTER_MANDATORY``) if the engine sends to a rank that is gone.
"""

from __future__ import annotations

import zmq

from parallel.protocol import decode, encode


def _identity(rank: int) -> bytes:
    return f"rank-{rank}".encode()


class EngineChannel:
    """The scheduler's end: binds a free port chosen by ZeroMQ (two engines on one host never collide)."""

    def __init__(self, host: str = "127.0.0.1"):
        self.context = zmq.Context()
        self.socket = self.context.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.ROUTER_MANDATORY, 1)
        if host == "localhost":
            host = "127.0.0.1"
        bind_host = host if host == "127.0.0.1" else "*"  # a remote rank must be able to reach it
        port = self.socket.bind_to_random_port(f"tcp://{bind_host}")
        self.address = f"tcp://{host}:{port}"

    def send(self, rank: int, message) -> None:
        self.send_bytes(rank, encode(message))

    def send_bytes(self, rank: int, payload: bytes) -> None:
        self.socket.send_multipart([_identity(rank), payload], copy=False)

    def broadcast(self, ranks, message) -> None:
        payload = encode(message)  # encode once, send to each worker
        for rank in ranks:
            self.send_bytes(rank, payload)

    def poll(self, timeout_ms: int) -> bool:
        return bool(self.socket.poll(timeout_ms, zmq.POLLIN))

    def recv(self):
        """One message from any worker: ``(rank, message)``. Call after ``poll`` says one is there."""
        identity, payload = self.socket.recv_multipart()
        rank = int(identity.decode().split("-", 1)[1])
        return rank, decode(payload)

    def close(self) -> None:
        self.socket.close(linger=0)
        self.context.term()


class WorkerChannel:
    """A worker's end: a DEALER connected to the engine's address."""

    def __init__(self, address: str, rank: int):
        self.context = zmq.Context()
        self.socket = self.context.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 1000)  # let a last error message get out before exit
        self.socket.setsockopt(zmq.IDENTITY, _identity(rank))
        self.socket.connect(address)

    def send(self, message) -> None:
        self.socket.send(encode(message), copy=False)

    def poll(self, timeout_ms: int) -> bool:
        return bool(self.socket.poll(timeout_ms, zmq.POLLIN))

    def recv_bytes(self) -> bytes:
        return self.socket.recv(copy=True)

    def close(self) -> None:
        self.socket.close()
        self.context.term()
