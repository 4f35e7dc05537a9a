"""Which runs are durable: the request's `durability`, else the default (the runs that outlive their call)."""

from __future__ import annotations

import pytest

from agent.v1 import agent_pb2 as pb
from fake_tools import all_tools
from service.callers import Caller
from service.config import CallerConfig, Config
from service.errors import DurabilityUnavailable
from service.rpc.validate import Validator

R = pb.RunAgentRequest


@pytest.mark.parametrize(
    ("durability", "on_disconnect", "background", "durable"),
    [
        (R.DURABILITY_UNSPECIFIED, R.ON_DISCONNECT_UNSPECIFIED, False, False),  # CANCEL: the caller retries
        (R.DURABILITY_UNSPECIFIED, R.CANCEL, False, False),
        (R.DURABILITY_UNSPECIFIED, R.CONTINUE, False, True),  # outlives its call
        (R.DURABILITY_UNSPECIFIED, R.ON_DISCONNECT_UNSPECIFIED, True, True),  # SubmitRun
        (R.DURABLE, R.CANCEL, False, True),
        (R.NOT_DURABLE, R.CONTINUE, False, False),
        (R.NOT_DURABLE, R.CANCEL, True, False),
    ],
)
def test_durability_follows_the_request_else_whether_the_run_outlives_its_call(
    durability: int, on_disconnect: int, background: bool, durable: bool
) -> None:
    validator = Validator(Config(), all_tools(), {}, "m", durable=True)
    caller = Caller("alice", CallerConfig(name="alice"), "none")
    request = R(message="hi", durability=durability, on_disconnect=on_disconnect)  # type: ignore[arg-type]
    spec = validator.run_spec(request, "run_1", caller, background=background)
    assert spec.durable is durable


def test_a_server_that_cannot_checkpoint_makes_no_run_durable_and_refuses_to_promise_one() -> None:
    """Until a checkpoint store is wired, a run that outlives its call is not durable, and asking for DURABLE is
    FAILED_PRECONDITION saying so, rather than a run that would silently not survive a crash."""
    validator = Validator(Config(), all_tools(), {}, "m")
    caller = Caller("alice", CallerConfig(name="alice"), "none")
    assert not validator.run_spec(R(message="hi", on_disconnect=R.CONTINUE), "run_1", caller).durable
    assert not validator.run_spec(R(message="hi"), "run_2", caller, background=True).durable
    with pytest.raises(DurabilityUnavailable, match="does not checkpoint runs yet") as info:
        validator.run_spec(R(message="hi", durability=R.DURABLE), "run_3", caller)
    assert info.value.code == "FAILED_PRECONDITION"


@pytest.mark.parametrize(
    ("default", "durability", "on_disconnect", "durable"),
    [
        ("durable", R.DURABILITY_UNSPECIFIED, R.CANCEL, True),  # the caller's policy: every run of it
        ("not_durable", R.DURABILITY_UNSPECIFIED, R.CONTINUE, False),
        ("not_durable", R.DURABLE, R.CANCEL, True),  # the request's word wins
        ("durable", R.NOT_DURABLE, R.CONTINUE, False),
    ],
)
def test_a_callers_durability_is_the_default_of_its_requests(
    default: str, durability: int, on_disconnect: int, durable: bool
) -> None:
    validator = Validator(Config(), all_tools(), {}, "m", durable=True)
    caller = Caller("risk", CallerConfig(name="risk", durability=default), "none")  # type: ignore[arg-type]
    request = R(message="hi", durability=durability, on_disconnect=on_disconnect)  # type: ignore[arg-type]
    assert validator.run_spec(request, "run_1", caller).durable is durable
