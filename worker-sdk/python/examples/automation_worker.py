"""Automation worker (service ``automation``), Python edition: the shape of an
agent run. **No agent or model runs here**: every step is scripted and says so.

It speaks the same messages as the Rust ``automation_worker`` example, so the
two can serve one route side by side:

``run_task`` (request, data ``{"task"?, "ask_human"?, "question"?, "step_ms"?}``)
streams partial replies whose message types are the agent frame kinds:

1. ``THOUGHT`` ``{"text"}``, then ``ACTION`` ``{"action", "input", "simulated": true}``;
2. only when ``ask_human`` is true or ``question`` is a string: a
   ``HUMAN_INPUT_REQUEST`` ``{"question", "question_id"}``; the run then waits
   (until its deadline or a cancel) for a ``HUMAN_RESPONSE`` from the same
   connection, sent as a request or fire-and-forget, with data
   ``{"question_id"?, "response"}`` (without ``question_id`` it answers the
   connection's oldest open question);
3. three ``STREAM`` frames ``{"chunk", "index"}``;
4. the final reply, typed ``OUTPUT``: ``{"result", "human_response", "simulated": true}``.

``echo`` answers with the request's data unchanged.

The answer must reach the worker that asked: with several automation workers,
give the route connection affinity (``"affinity": true``), so every message of
a connection goes to the same worker.

Run: ``python automation_worker.py --bridge-endpoint tcp://127.0.0.1:5555``
(see ``--help``).
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from bridge_worker import Context, EventContext, HandlerError, Partial, Reply, Worker, cli
from bridge_worker.protocol import Disconnect

log = logging.getLogger("automation_worker")

MAX_OPEN_QUESTIONS = 16
"""Open questions a connection may have at once."""
DEFAULT_QUESTION = "May the example agent proceed with this task?"


@dataclass
class Question:
    id: str
    answer: asyncio.Future[Any] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class Questions:
    """Open questions per connection, oldest first."""

    def __init__(self) -> None:
        self._open: dict[str, collections.deque[Question]] = {}

    def ask(self, conn: str, question_id: str) -> Question:
        open_ = self._open.setdefault(conn, collections.deque())
        if len(open_) >= MAX_OPEN_QUESTIONS:
            raise HandlerError.overloaded("too many open questions on this connection")
        q = Question(question_id)
        open_.append(q)
        return q

    def withdraw(self, conn: str, q: Question) -> None:
        open_ = self._open.get(conn)
        if open_ is not None and q in open_:
            open_.remove(q)
            if not open_:
                del self._open[conn]

    def answer(self, conn: str, data: Any) -> str:
        """Delivers a ``HUMAN_RESPONSE`` to the question it answers; returns its id."""
        wanted = data.get("question_id") if isinstance(data, dict) else None
        response = data.get("response", data) if isinstance(data, dict) else data
        open_ = self._open.get(conn)
        if not open_:
            raise HandlerError.bad_request("no question is waiting for an answer on this connection")
        q = next((q for q in open_ if q.id == wanted), None) if wanted is not None else open_[0]
        if q is None:
            raise HandlerError.bad_request("no open question matches this HUMAN_RESPONSE")
        self.withdraw(conn, q)
        q.answer.set_result(response)
        return q.id

    def forget(self, conn: str) -> None:
        for q in self._open.pop(conn, ()):
            if not q.answer.done():
                q.answer.set_exception(HandlerError.cancelled("the connection closed"))


worker = Worker(["automation"])
questions = Questions()


@worker.handler("run_task")
async def run_task(ctx: Context, data: Any) -> AsyncIterator[Partial | Reply]:
    if data is not None and not isinstance(data, dict):
        raise HandlerError.bad_request("run_task data must be an object")
    data = data or {}
    task = data.get("task") if isinstance(data.get("task"), str) else "(no task given)"
    step = float(data.get("step_ms", 100)) / 1000  # pacing of the scripted steps, to look alive

    yield Partial({"text": f"[simulated agent] Planning how to approach: {task}"}, "THOUGHT")
    await asyncio.sleep(step)
    yield Partial({"action": "inspect_task", "input": {"task_chars": len(task)}, "simulated": True}, "ACTION")
    await asyncio.sleep(step)

    question = data.get("question") if isinstance(data.get("question"), str) else None
    if question is None and data.get("ask_human") is True:
        question = DEFAULT_QUESTION
    human_response = None
    if question is not None:
        # Registered before the question goes out, so even an instant answer finds its waiter.
        q = questions.ask(ctx.connection_id, ctx.correlation_id)
        try:
            yield Partial({"question": question, "question_id": q.id}, "HUMAN_INPUT_REQUEST")
            # A cancel or the deadline cancels this task here; the SDK answers the router.
            human_response = await q.answer
        finally:
            questions.withdraw(ctx.connection_id, q)
        yield Partial({"text": "[simulated agent] Got the human's answer; continuing."}, "THOUGHT")

    for i, chunk in enumerate(["[simulated] Working", " through the task", " step by step."]):
        await asyncio.sleep(step)
        yield Partial({"chunk": chunk, "index": i}, "STREAM")

    yield Reply(
        {"result": f"[simulated] finished the task: {task}", "human_response": human_response, "simulated": True},
        "OUTPUT",
    )


@worker.handler("HUMAN_RESPONSE")
async def human_response_request(ctx: Context, data: Any) -> dict[str, Any]:
    return {"accepted": True, "question_id": questions.answer(ctx.connection_id, data)}


@worker.event("HUMAN_RESPONSE")
async def human_response_event(ctx: EventContext, data: Any) -> None:
    try:
        questions.answer(ctx.connection_id, data)
    except HandlerError as e:
        # No reply to carry the error: the client gets an error frame without id.
        log.info("HUMAN_RESPONSE event not delivered: %s", e.code)
        await ctx.send_error(e)


@worker.on_disconnect
async def forget_questions(ctx: EventContext, info: Disconnect) -> None:
    questions.forget(ctx.connection_id)


@worker.handler("echo")
async def echo(ctx: Context, data: Any) -> Any:
    return data


if __name__ == "__main__":
    cli.main(worker, description="Example agent-style worker (scripted steps; no agent runs)")
