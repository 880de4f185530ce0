"""End to end with worker processes: the example workers (SDK and raw), a
worker killed mid-request, and a pool mixing a Rust and a Python worker."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import re
import signal
import sys
from typing import Any

import pytest
from conftest import EXAMPLES, PYTHON_SDK, REPO, RUST_ECHO_BIN, Client, Harness, Proc, running

from bridge_worker import Context, Worker

# Each test once per worker transport (conftest.py, `transport`).
pytestmark = [pytest.mark.timeout(60), pytest.mark.usefixtures("transport")]


def registered(proc: Proc, worker_id: str, services: list[str]) -> None:
    line = proc.wait_stdout(lambda line: '"registered"' in line, timeout=15)
    assert json.loads(line) == {"event": "registered", "worker_id": worker_id, "services": services}
    # The compact form the Rust examples print.
    assert line == json.dumps(json.loads(line), separators=(",", ":"))


def is_error(frame: dict[str, Any], code: str) -> bool:
    return frame.get("type") == "error" and frame.get("done") is True and frame["error"]["code"] == code


async def until_question(c: Client, id: str) -> tuple[list[str], dict[str, Any]]:
    """Frame types of run ``id`` up to its HUMAN_INPUT_REQUEST, and that frame."""
    types = []
    while True:
        frame = await c.next(lambda f: isinstance(f, dict) and f.get("id") == id)
        assert not frame["done"], frame
        types.append(frame["type"])
        if frame["type"] == "HUMAN_INPUT_REQUEST":
            return types, frame


def test_automation_example(harness: Harness) -> None:
    router = harness.router()
    worker = harness.python_example("automation_worker.py", router, "--id", "auto-py")
    registered(worker, "auto-py", ["automation"])

    async def main() -> None:
        async with Client.connect(router.url("/ws/automation")) as c:
            assert (await c.call("echo", {"x": [1, 2]}))["data"] == {"x": [1, 2]}

            # The answer as a fire-and-forget message.
            id = await c.request("run_task", {"task": "tidy the desk", "ask_human": True, "step_ms": 0})
            types, question = await until_question(c, id)
            assert types == ["THOUGHT", "ACTION", "HUMAN_INPUT_REQUEST"]
            assert question["data"]["question"]
            await c.send(
                {"type": "HUMAN_RESPONSE", "data": {"question_id": question["data"]["question_id"], "response": "yes"}}
            )
            partials, final = await c.terminal(id)
            assert [p["type"] for p in partials] == ["THOUGHT", "STREAM", "STREAM", "STREAM"]
            assert final["type"] == "OUTPUT"
            assert (final["data"]["human_response"], final["data"]["simulated"]) == ("yes", True)

            # The answer as a request, without question_id (the oldest open question).
            id = await c.request("run_task", {"task": "t", "question": "Proceed?", "step_ms": 0})
            _, question = await until_question(c, id)
            assert question["data"]["question"] == "Proceed?"
            ack = await c.call("HUMAN_RESPONSE", {"response": {"ok": True}})
            assert ack["data"] == {"accepted": True, "question_id": question["data"]["question_id"]}
            _, final = await c.terminal(id)
            assert final["data"]["human_response"] == {"ok": True}

            # No question: straight through.
            _, final = await c.terminal(await c.request("run_task", {"step_ms": 0}))
            assert final["type"] == "OUTPUT" and final["data"]["human_response"] is None

            assert is_error(await c.call("HUMAN_RESPONSE", {"response": "late"}), "bad_request")
            # The same, fire-and-forget: an error frame without id rather than nothing.
            await c.send({"type": "HUMAN_RESPONSE", "data": {"response": "late"}})
            late = await c.next(lambda f: isinstance(f, dict) and f.get("type") == "error")
            assert is_error(late, "bad_request") and "id" not in late, late

        worker.signal(signal.SIGTERM)
        assert await worker.wait_async(10) == 0

    asyncio.run(main())


def test_readme_worker(harness: Harness) -> None:
    readme = (PYTHON_SDK / "README.md").read_text(encoding="utf-8")
    code = re.search(r"## A complete worker\n\n```python\n(.*?)```", readme, re.S)
    assert code is not None, "README lost its complete worker"
    assert len(code.group(1).strip().splitlines()) < 20
    # The repository's README shows the same worker: both stay what this test runs.
    top = re.search(r"\*\*Python\*\*.*?```python\n(.*?)```", (REPO / "README.md").read_text(encoding="utf-8"), re.S)
    assert top is not None and top.group(1) == code.group(1), "README.md's Python worker differs from the SDK README's"

    script = harness.tmp_path / "readme_worker.py"
    script.write_text(code.group(1), encoding="utf-8")
    router = harness.router()
    worker = harness.spawn(
        "readme_worker", [sys.executable, str(script), "--bridge-endpoint", router.bridge, "--id", "readme"]
    )
    registered(worker, "readme", ["chat"])

    async def main() -> None:
        async with Client.connect(router.url("/ws")) as c:
            assert (await c.call("echo", "hi"))["data"] == "hi"
            partials, final = await c.terminal(await c.request("count", {"n": 2}))
            assert [p["data"] for p in partials] == [{"i": 0}, {"i": 1}] and final["data"] == {"n": 2}
            assert is_error(await c.call("count", "x"), "bad_request")

    asyncio.run(main())
    worker.signal(signal.SIGINT)
    assert worker.wait(10) == 0


def readme_types(worker: str) -> list[str]:
    """The message types the README's table of example workers lists for ``worker``."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    for row in readme.splitlines():
        cells = row.split("|")
        if len(cells) == 6 and f"`{worker}`" in cells[2]:
            return re.findall(r"`([^`]+)`", cells[3])
    raise AssertionError(f"README's table of example workers has no row for {worker}")


def test_readme_lists_what_the_python_example_workers_announce() -> None:
    spec = importlib.util.spec_from_file_location("automation_example", EXAMPLES / "automation_worker.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    try:
        spec.loader.exec_module(module)  # defines the worker; runs nothing (the __main__ guard)
    finally:
        del sys.modules[spec.name]
    assert module.worker.msg_types == readme_types("automation_worker.py")
    # raw_echo_worker.py's hello (checked on the wire by test_session) announces these.
    assert readme_types("raw_echo_worker.py") == ["echo", "sleep"]


def test_cli_secret_from_the_environment(harness: Harness) -> None:
    router = harness.router("tcp://127.0.0.1:0", "tcp://127.0.0.1:0", "--bridge-secret", "s3cr3t")
    refused = harness.python_example("automation_worker.py", router, env={"BRIDGE_SECRET": "guess-7f3a"})
    assert refused.wait(15) == 1
    assert any("refused" in line for line in refused.stderr), refused.tail()
    assert not any("guess-7f3a" in line for line in refused.stderr), "the secret was logged"
    missing = harness.python_example("automation_worker.py", router, env={"BRIDGE_SECRET": ""})
    assert missing.wait(15) == 1
    assert any("set BRIDGE_SECRET" in line for line in missing.stderr), missing.tail()
    accepted = harness.python_example("automation_worker.py", router, "--id", "a", env={"BRIDGE_SECRET": "s3cr3t"})
    registered(accepted, "a", ["automation"])


def test_worker_killed_mid_request_gives_one_terminal_error(harness: Harness) -> None:
    router = harness.router()
    worker = harness.python_example("automation_worker.py", router, "--id", "doomed")
    registered(worker, "doomed", ["automation"])

    async def main() -> None:
        async with Client.connect(router.url("/ws/automation")) as c:
            id = await c.request("run_task", {"ask_human": True, "step_ms": 0})
            await until_question(c, id)
            worker.signal(signal.SIGKILL)
            _, terminal = await c.terminal(id)
            assert is_error(terminal, "worker_error")
            # Anything else for the request would have been sent before the pong.
            await c.send({"type": "ping", "id": "p"})
            await c.next(lambda f: isinstance(f, dict) and f.get("type") == "pong")
            assert c.frames_for(id) == []

    asyncio.run(main())


def test_raw_echo_worker(harness: Harness) -> None:
    router = harness.router()
    worker = harness.python_example("raw_echo_worker.py", router, "--service", "raw-echo", "--id", "raw-1")
    registered(worker, "raw-1", ["raw-echo"])

    async def main() -> None:
        async with Client.connect(router.url("/ws/rawworker")) as c:
            data = {"text": "héllo", "n": [1, 2.5, None]}
            assert (await c.call("echo", data))["data"] == data
            assert (await c.call("sleep", {"ms": 20}))["data"] == {"slept_ms": 20}
            assert is_error(await c.call("nope"), "unknown_type")

            id = await c.request("sleep", {"ms": 60_000})
            await c.send({"type": "cancel", "data": {"id": id}})
            _, terminal = await c.terminal(id)
            assert is_error(terminal, "cancelled")
            # The worker's `cancelled` answer gives the credit back at the router.
            for _ in range(100):
                workers = await asyncio.to_thread(router.workers, "raw-echo")
                if workers and workers[0]["in_flight"] == 0:
                    break
                await asyncio.sleep(0.05)
            else:
                raise AssertionError(f"credit not released: {workers}")

            # A silent router: the worker drops its socket and says hello on a new one.
            stderr_mark = len(worker.stderr)
            router.proc.signal(signal.SIGSTOP)
            try:
                await asyncio.to_thread(_wait_stderr, worker, "new socket", stderr_mark)
            finally:
                router.proc.signal(signal.SIGCONT)
            for _ in range(100):  # until the router has the new registration (bounded)
                f = await c.call("echo", "back")
                if f.get("data") == "back":
                    break
                assert is_error(f, "no_workers") or is_error(f, "worker_error"), f
                await asyncio.sleep(0.05)
            else:
                raise AssertionError("the raw worker did not come back")

        worker.signal(signal.SIGTERM)
        assert await worker.wait_async(10) == 0

    asyncio.run(main())


def test_raw_echo_worker_with_a_secret(harness: Harness) -> None:
    router = harness.router("tcp://127.0.0.1:0", "tcp://127.0.0.1:0", "--bridge-secret", "s3cr3t")
    worker = harness.python_example(
        "raw_echo_worker.py", router, "--service", "raw-echo", "--id", "raw-s", env={"BRIDGE_SECRET": "s3cr3t"}
    )
    registered(worker, "raw-s", ["raw-echo"])

    async def main() -> None:
        async with Client.connect(router.url("/ws/rawworker")) as c:
            assert (await c.call("echo", [1, "two"]))["data"] == [1, "two"]

    asyncio.run(main())
    worker.signal(signal.SIGTERM)
    assert worker.wait(10) == 0
    assert not any("s3cr3t" in line for line in worker.stderr), "the secret was logged"


def _wait_stderr(proc: Proc, needle: str, start: int, timeout: float = 10.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not any(needle in line for line in proc.stderr[start:]):
        if time.monotonic() > deadline:
            raise AssertionError(f"{proc.name} never logged {needle!r}\n{proc.tail()}")
        time.sleep(0.02)


@pytest.mark.skipif(not RUST_ECHO_BIN.exists(), reason=f"Rust echo_worker not built ({RUST_ECHO_BIN})")
def test_mixed_pool_of_rust_and_python_workers(harness: Harness) -> None:
    router = harness.router()
    rust = harness.spawn(
        "echo_worker",
        [
            str(RUST_ECHO_BIN),
            "--bridge-endpoint",
            router.bridge,
            "--service",
            "mixed",
            "--capacity",
            "1",
            "--id",
            "rust-1",
        ],
    )
    registered(rust, "rust-1", ["mixed"])
    py = Worker(["mixed"], endpoint=router.bridge, capacity=1, worker_id="py-1")

    @py.handler("slow")
    async def slow(ctx: Context, data: Any) -> dict[str, Any]:
        await asyncio.sleep(data["ms"] / 1000)
        return {"slept_ms": data["ms"], "sdk": "python"}

    async def main() -> None:
        async with running(py), Client.connect(router.url("/ws/mixed")) as c:
            # Capacity 1 each: two requests at once must go to both workers.
            for _ in range(3):
                ids = [await c.request("slow", {"ms": 300}) for _ in range(2)]
                finals = [(await c.terminal(id))[1] for id in ids]
                assert all(f["data"]["slept_ms"] == 300 for f in finals), finals
                assert sorted(f["data"].get("sdk", "rust") for f in finals) == ["python", "rust"]

    asyncio.run(main())
