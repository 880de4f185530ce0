"""FastAPI/uvicorn JSON echo: the stack many of the router's users come from,
measured by ``loadgen`` beside the router's JSON echo route (BENCHMARKS.md,
"Open loop: latency under load"; started by ``scripts/bench.sh``).

One WebSocket endpoint, ``/ws``, that answers what the router's JSON route
served by the echo worker answers (README, "Client protocol"):

- on connect, a welcome frame
  ``{"type":"welcome","data":{"session_id","route","heartbeat_ms","limits"},"seq":0}``;
- a request ``{"type","id","data"}`` gets one final reply
  ``{"type","id","correlation_id","data","done":true,"seq"}`` with the same
  type, id and data; without an ``id`` it is fire-and-forget (no reply);
- a frame that is not a JSON object with a string ``type``, or a binary
  frame, gets ``{"type":"error","id","done":true,"error":{"code":"bad_request","message"},"seq"}``.

The reply is built in the handler, in the same process: no routing, no
worker, one event loop (uvloop) in one process, as a FastAPI app is usually
deployed per core.

Run: ``python app.py [--host 127.0.0.1] [--port 0]``. Prints one line once
the socket is bound, ``{"event":"listening","http":"HOST:PORT"}`` (port 0
picks a free port), like ``baseline_echo`` and the router. SIGTERM or SIGINT
stops it.
"""

from __future__ import annotations

import argparse
import json
import socket
import uuid
from typing import Any

import uvicorn
from fastapi import FastAPI, WebSocket

app = FastAPI()

# The router's JSON is compact; so is this, so both move the same bytes.
dumps = json.JSONEncoder(separators=(",", ":")).encode

LIMITS = {"max_message_bytes": 1048576, "max_in_flight": 64}


@app.websocket("/ws")
async def echo(ws: WebSocket) -> None:
    await ws.accept()
    session = uuid.uuid4().hex
    # Correlation ids: unique per request and as long as the router's ULIDs
    # (26 characters), without a random draw per message.
    prefix = session[:16]
    seq = 0
    welcome = {"session_id": session, "route": "/ws", "heartbeat_ms": 20000, "limits": LIMITS}
    await ws.send_text(dumps({"type": "welcome", "data": welcome, "seq": seq}))
    while True:
        message = await ws.receive()
        if message["type"] == "websocket.disconnect":
            return
        text = message.get("text")
        request: Any = None
        if text is not None:
            try:
                request = json.loads(text)
            except ValueError:
                request = None
        if not isinstance(request, dict) or not isinstance(request.get("type"), str):
            seq += 1
            error = {"code": "bad_request", "message": "expected a JSON object with a string type"}
            rid = request.get("id") if isinstance(request, dict) else None
            await ws.send_text(dumps({"type": "error", "id": rid, "done": True, "error": error, "seq": seq}))
            continue
        rid = request.get("id")
        if rid is None:
            continue
        seq += 1
        reply = {
            "type": request["type"],
            "id": rid,
            "correlation_id": f"{prefix}{seq:010x}",
            "data": request.get("data"),
            "done": True,
            "seq": seq,
        }
        await ws.send_text(dumps(reply))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()

    # Bound here rather than by uvicorn, so port 0 works and the chosen
    # port can be announced.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((args.host, args.port))
    host, port = sock.getsockname()
    config = uvicorn.Config(
        app,
        loop="uvloop",
        http="httptools",
        ws="websockets-sansio",
        lifespan="off",
        log_level="warning",
        access_log=False,
        backlog=4096,
    )
    server = uvicorn.Server(config)
    # Connections that arrive before uvicorn starts accepting wait in the
    # listen backlog, so announcing now is safe.
    sock.listen(4096)
    print(dumps({"event": "listening", "http": f"{host}:{port}"}), flush=True)
    server.run(sockets=[sock])


if __name__ == "__main__":
    main()
