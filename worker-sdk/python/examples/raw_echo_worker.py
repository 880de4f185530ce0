"""A bridge worker written from bridge-proto/PROTOCOL.md alone: pyzmq and
msgpack, no SDK. It shows what any language needs to serve a route.

- ``echo`` requests: final reply with the request's data unchanged;
- ``sleep`` requests ``{"ms": N}``: final reply ``{"slept_ms": N}`` after N ms,
  unless cancelled (answered ``cancelled``) or past the deadline (``timeout``);
- any other request type: ``unknown_type``;
- a request that does not decode but has a string ``cid``: ``bad_request``
  (so its credit comes back).

Protocol version 2: every message has ``v: 2``; frames of version 1 or 2 are
accepted. Life cycle (PROTOCOL.md §8): hello (resent every backoff step until
the welcome); a ``challenge{nonce}`` is answered with
``auth{proof: HMAC-SHA256(BRIDGE_SECRET, "bridge-proto/2 auth\\0" + nonce)}``
(exit 1 without a secret; the secret itself is never sent); heartbeats every
``heartbeat_ms``; no frame bigger than the welcome's ``max_frame_bytes`` (a
reply over it becomes ``payload_too_large``); a new socket after a backoff
when the router is silent for ``heartbeat_ms * liveness`` or says
``goodbye{reconnect: true}``; exit 1 on ``goodbye{reconnect: false}``; and on
SIGTERM/SIGINT ``bye`` and exit 0 once nothing is outstanding.

Usage: ``python raw_echo_worker.py [--bridge-endpoint E] [--service S] [--id ID]``
(endpoint default ``$BRIDGE_ENDPOINT`` or ``tcp://127.0.0.1:5555``; secret from
``$BRIDGE_SECRET``). Prints ``{"event":"registered",...}`` on stdout when first
welcomed; logs on stderr.
"""

import argparse
import hashlib
import hmac
import json
import logging
import os
import random
import signal
import sys
import time

import msgpack
import zmq

log = logging.getLogger("raw_echo_worker")
HANDSHAKE_TIMEOUT = 5.0  # seconds without any answer before a new socket (§8.1)
V = 2  # the version this worker speaks; it also reads version 1 (same bodies)
AUTH_DOMAIN = b"bridge-proto/2 auth\x00"  # §14


def encode(kind, **fields):
    return msgpack.packb({"v": V, "kind": kind, **fields}, use_bin_type=True)


def decode(frame):
    msg = msgpack.unpackb(frame, raw=False)
    if not isinstance(msg, dict) or msg.get("v") not in (1, 2) or not isinstance(msg.get("kind"), str):
        raise ValueError("not a version 1 or 2 bridge message")
    return msg


def readable_cid(frame):
    """The cid of an undecodable frame that is a map with kind "request" and a string cid."""
    try:
        msg = msgpack.unpackb(frame, raw=False, strict_map_key=False)
    except Exception:
        return None
    if isinstance(msg, dict) and msg.get("kind") == "request" and isinstance(msg.get("cid"), str):
        return msg["cid"]
    return None


def error(cid, code, message):
    return encode("error", cid=cid, code=code, message=message, retryable=False)


def proof(secret, nonce):
    return hmac.new(secret.encode("utf-8"), AUTH_DOMAIN + nonce, hashlib.sha256).digest()


def answer(sock, max_frame, cid, frame):
    """Sends a request's terminal message, replaced by payload_too_large when it is
    bigger than the router's frame limit (a bigger frame closes our connection)."""
    if max_frame is not None and len(frame) > max_frame:
        limit = f"the router's frame limit of {max_frame} bytes"
        frame = error(cid, "payload_too_large", f"reply of {len(frame)} bytes exceeds {limit}")
    sock.send(frame)


def backoff(attempt):  # seconds: equal jitter over min(100 ms * 2^n, 5 s)
    step = min(0.1 * 2**attempt, 5.0)
    return random.uniform(step / 2, step)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bridge-endpoint", default=os.environ.get("BRIDGE_ENDPOINT") or "tcp://127.0.0.1:5555")
    p.add_argument("--service", action="append", dest="services")
    p.add_argument("--id", default=f"raw-echo-{os.getpid()}")
    args = p.parse_args()
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    stop = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.append(True))
    hello = encode(
        "hello",
        worker_id=args.id,
        services=args.services or ["echo"],
        capacity=8,
        sdk="raw-echo/0.2",
        msg_types=["echo", "sleep"],  # what it handles, shown in the router's /routes (§5)
    )
    secret = os.environ.get("BRIDGE_SECRET", "").strip() or None  # never sent, never logged
    zctx, attempt, announced = zmq.Context(), 0, False

    while True:  # one iteration = one socket = one session
        sock = zctx.socket(zmq.DEALER)  # no routing id, no ZMTP heartbeats (§1)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(args.bridge_endpoint)
        sock.send(hello)
        now = time.monotonic()
        registered, stopping, heartbeat, silence = False, False, 1.0, HANDSHAKE_TIMEOUT
        max_frame = None  # the welcome's max_frame_bytes: bigger frames close our connection
        last_heard = last_sent = now
        next_hello = now + backoff(attempt)
        sleeping = {}  # cid -> (wake time, deadline, ms): outstanding `sleep` requests
        while True:
            if stop and not stopping:
                if not registered:
                    return 0
                stopping = True
                sock.send(encode("bye", reason="signal"))
            if stopping and not sleeping:
                sock.close(linger=500)  # let the last answers leave (§15)
                return 0
            if sock.poll(20, zmq.POLLIN):
                frame = sock.recv()
                last_heard = time.monotonic()
                try:
                    msg = decode(frame)
                    kind = msg["kind"]
                    if kind == "request":  # the fields this worker reads, with their types
                        ok = isinstance(msg.get("cid"), str) and isinstance(msg.get("msg_type"), str)
                        if not ok or not isinstance(msg.get("timeout_ms"), int) or "data" not in msg:
                            raise ValueError("invalid request")
                except Exception as e:
                    cid = readable_cid(frame)
                    if registered and cid is not None:  # still owed a terminal message (§9.1)
                        log.warning("request %s does not decode: answering bad_request", cid)
                        answer(
                            sock, max_frame, cid, error(cid, "bad_request", f"the request could not be decoded: {e}")
                        )
                    else:
                        log.warning("dropped an undecodable frame (%d bytes): %s", len(frame), e)
                    continue
                if kind == "welcome":
                    registered, attempt = True, 0
                    heartbeat = msg["heartbeat_ms"] / 1000
                    silence = heartbeat * msg["liveness"]
                    max_frame = msg.get("max_frame_bytes")
                    if not announced:
                        announced = True
                        line = {"event": "registered", "worker_id": args.id, "services": args.services or ["echo"]}
                        print(json.dumps(line, separators=(",", ":")), flush=True)
                elif kind == "challenge" and not registered:
                    if secret is None:
                        log.error("the router requires a bridge secret: set BRIDGE_SECRET")
                        return 1
                    sock.send(encode("auth", proof=proof(secret, msg["nonce"])))  # answer every challenge
                elif kind == "goodbye":
                    if not msg["reconnect"]:
                        log.error("the router refused this worker: %s", msg["reason"])
                        return 1
                    log.info("goodbye from the router (%s): reconnecting", msg["reason"])
                    break
                elif not registered:
                    pass  # nothing but welcome/goodbye is valid before the welcome
                elif kind == "request":
                    cid, received = msg["cid"], time.monotonic()
                    if stopping:
                        sock.send(encode("error", cid=cid, code="worker_error", message="stopping", retryable=True))
                    elif msg["msg_type"] == "echo":
                        answer(sock, max_frame, cid, encode("reply", cid=cid, done=True, data=msg["data"]))
                    elif msg["msg_type"] == "sleep":
                        data = msg["data"] if isinstance(msg["data"], dict) else {}
                        ms = data.get("ms", 0) if isinstance(data.get("ms", 0), int) else 0
                        sleeping[cid] = (received + ms / 1000, received + msg["timeout_ms"] / 1000, ms)
                    else:
                        message = f"this worker has no handler for requests of type `{msg['msg_type']}`"
                        sock.send(error(cid, "unknown_type", message))
                elif kind == "cancel" and sleeping.pop(msg["cid"], None) is not None:  # else: already answered
                    sock.send(error(msg["cid"], "cancelled", f"request cancelled ({msg['reason']})"))
                elif kind in ("event", "binary"):  # no handler here: tell the client (§5, push)
                    what = (
                        "binary frames" if kind == "binary" else f"fire-and-forget messages of type `{msg['msg_type']}`"
                    )
                    message = f"this worker has no handler for {what}"
                    data = {"code": "unknown_type", "message": message}
                    sock.send(encode("push", conn=msg["conn"], msg_type="error", data=data))
                # heartbeat, raw, connect, disconnect: nothing owed
            now = time.monotonic()
            for cid, (wake, deadline, ms) in list(sleeping.items()):
                if now >= deadline:
                    del sleeping[cid]
                    sock.send(error(cid, "timeout", "the deadline passed"))
                elif now >= wake:
                    del sleeping[cid]
                    sock.send(encode("reply", cid=cid, done=True, data={"slept_ms": ms}))
            if registered and now - last_sent >= heartbeat:
                sock.send(encode("heartbeat"))
                last_sent = now
            if not registered and now >= next_hello:
                sock.send(hello)  # resend on the same socket (§8.1)
                attempt += 1
                next_hello = now + backoff(attempt)
            if now - last_heard >= silence:
                log.warning("nothing from the router for %.1f s: new socket", now - last_heard)
                break
        sock.close(linger=0)  # what was outstanding is abandoned: the router has failed it
        if stop:
            return 0
        time.sleep(backoff(attempt))
        attempt += 1


if __name__ == "__main__":
    sys.exit(main())
