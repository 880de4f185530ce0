"""``--processes N``: a supervisor and N worker processes registered with the
real router as one pool, the signals it forwards, and its exit status."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time

import pytest
from conftest import Client, Harness, Proc, Router, eventually

# Each test once per worker transport (conftest.py, `transport`).
pytestmark = [pytest.mark.timeout(60), pytest.mark.usefixtures("transport")]


def start_pool(harness: Harness, router: Router, n: int, *args: str) -> tuple[Proc, list[int]]:
    """The automation example under a supervisor of ``n`` processes, once all are registered."""
    proc = harness.python_example("automation_worker.py", router, "--processes", str(n), *args)
    line = proc.wait_stdout(lambda line: '"registered"' in line, timeout=20)
    pool = json.loads(line)
    assert pool["event"] == "registered" and pool["processes"] == n and pool["services"] == ["automation"], pool
    assert len(set(pool["pids"])) == n and proc.popen.pid not in pool["pids"]
    # One line for the pool, not one per child.
    assert sum('"registered"' in line for line in proc.stdout) == 1
    return proc, pool["pids"]


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # Reaped by the supervisor once it exits; a zombie until then.
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] == "Z"


def wait_gone(pids: list[int], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not all(gone(pid) for pid in pids):
        assert time.monotonic() < deadline, f"worker processes {pids} still running"
        time.sleep(0.02)


def test_a_pool_of_two_processes_serves_and_drains_on_sigterm(harness: Harness) -> None:
    router = harness.router()
    pool, pids = start_pool(harness, router, 2, "--id", "pool")

    async def main() -> None:
        await eventually(lambda: len(router.workers("automation")) == 2, what="two workers in /routes")
        assert sorted(w["id"] for w in router.workers("automation")) == ["pool-1", "pool-2"]
        # Enough connections that both workers get some (the route has affinity).
        async with contextlib.AsyncExitStack() as stack:
            clients = [await stack.enter_async_context(Client.connect(router.url("/ws/automation"))) for _ in range(8)]
            for i, c in enumerate(clients):
                assert (await c.call("echo", {"i": i, "x": 0.1}))["data"] == {"i": i, "x": 0.1}
            # The human-input flow: the answer reaches the process that asked.
            c = clients[0]
            id = await c.request("run_task", {"ask_human": True, "step_ms": 0})
            while True:
                frame = await c.next(lambda f: isinstance(f, dict) and f.get("id") == id)
                if frame["type"] == "HUMAN_INPUT_REQUEST":
                    break
            qid = frame["data"]["question_id"]
            await c.send({"type": "HUMAN_RESPONSE", "data": {"question_id": qid, "response": "yes"}})
            _, final = await c.terminal(id)
            assert final["type"] == "OUTPUT" and final["data"]["human_response"] == "yes"

            # A request in flight during the stop is drained, not dropped.
            slow = await c.request("run_task", {"step_ms": 300})
            await c.next(lambda f: isinstance(f, dict) and f.get("id") == slow)
            pool.signal(signal.SIGTERM)
            _, final = await c.terminal(slow)
            assert final["type"] == "OUTPUT", final
        assert await pool.wait_async(15) == 0
        wait_gone(pids)
        await eventually(lambda: router.workers("automation") == [], what="the pool gone from /routes")

    asyncio.run(main())


def test_a_child_that_dies_stops_the_pool_with_a_failure_status(harness: Harness) -> None:
    router = harness.router()
    pool, pids = start_pool(harness, router, 2)
    os.kill(pids[0], signal.SIGKILL)
    assert pool.wait(15) == 1
    wait_gone(pids)
    assert any("exited on its own" in line for line in pool.stderr), pool.tail()


def test_processes_must_be_positive(harness: Harness) -> None:
    router = harness.router()
    proc = harness.python_example("automation_worker.py", router, "--processes", "0")
    assert proc.wait(15) == 2
    assert any("--processes must be at least 1" in line for line in proc.stderr), proc.tail()
