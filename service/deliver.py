"""How an approval, a steering text or a tool cancel reaches a run's `Inbox`, wherever the run is driven: this
process's run directly; another replica's through the shared run store, which carries the message to the owner and
brings its answer back (a refusal keeps its status), the way CancelRun reaches the owner. Who may send what is
decided here, once: a run's caller and the configured approvers; nobody else learns that the run exists.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from service.errors import NotFound, Relayed, RequestError, RunAlreadyEnded
from service.interact import AFTER_TURN, ASAP, Decision, Inbox, Steer
from service.runs import RunRegistry


@dataclass(frozen=True, slots=True)
class Message:
    """One message for a run, as JSON-able data (it may cross to another replica). `kind`: decide, input, cancel."""

    kind: str
    by: str
    call_id: str = ""
    approved: bool = False
    reason: str = ""
    edited_input: dict[str, Any] | None = None
    text: str = ""
    when: str = ASAP

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Message:
        return cls(**data)


def apply(inbox: Inbox, message: Message) -> None:
    """Hand `message` to `inbox`; raises the `RequestError` that says why it makes no sense now."""
    match message.kind:
        case "decide":
            inbox.decide(
                message.call_id,
                Decision(message.approved, message.by, message.reason, message.edited_input),
            )
        case "input":
            inbox.send(Steer(message.text, message.when if message.when in (ASAP, AFTER_TURN) else ASAP, message.by))
        case "cancel":
            inbox.cancel_call(message.call_id, message.by)
        case _:
            raise RequestError(f"unknown message kind {message.kind!r}")


class Deliveries:
    """Delivers messages to runs for the RPC layer; `approvers` may reach any caller's run."""

    def __init__(self, registry: RunRegistry, approvers: frozenset[str]) -> None:
        self.registry = registry
        self.approvers = approvers
        if registry.store is not None:
            registry.store.on_message(self.arrived)

    def _may_reach(self, caller: str, identity: str, run_id: str) -> None:
        if identity != caller and identity not in self.approvers:
            # the very message of an unknown id: nothing confirms that another caller's run exists
            raise NotFound(f"no run {run_id!r}: unknown, or it ended and was forgotten")

    async def send(self, run_id: str, message: Message) -> None:
        run = self.registry.runs.get(run_id)
        if run is not None:
            self._may_reach(run.caller, message.by, run_id)
            if run.finished:
                raise RunAlreadyEnded(f"run {run_id} already ended ({run.state.value})")
            apply(run.control.inbox, message)
            return
        store = self.registry.store
        record = None if store is None else await store.record(run_id)
        if store is None or record is None:
            raise NotFound(f"no run {run_id!r}: unknown, or it ended and was forgotten")
        self._may_reach(record.caller, message.by, run_id)
        if record.finished:
            raise RunAlreadyEnded(f"run {run_id} already ended ({record.state})")
        answer = await store.deliver(record, message.to_dict())
        if answer:
            raise Relayed(answer["message"], code=answer["code"], reason=answer.get("reason", "RELAYED"))

    def arrived(self, run_id: str, data: dict[str, Any]) -> dict[str, str]:
        """A message another replica carried here: applied to the run driven here; the refusal, if any, as data."""
        run = self.registry.runs.get(run_id)
        try:
            if run is None or run.finished:
                raise RunAlreadyEnded(f"run {run_id} is no longer running on the replica that drove it")
            apply(run.control.inbox, Message.from_dict(data))
        except RequestError as exc:
            return {"code": exc.code, "message": exc.message, "reason": exc.reason}
        return {}
