"""`python -m service` as a process: flags, environment, config file, metrics endpoint and SIGTERM drain."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import sys
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from agent.v1 import agent_pb2 as pb
from conftest import cli, run_events, stub
from service.__main__ import parse_args
from service.config import ConfigError, load_config

DEFAULT_CONFIG = "model:\n  pacing: {first_token_ms: 0, token_interval_ms: 0}\nshutdown_grace_s: 5\n"


async def _spawn(tmp_path: Path, *args: str, env: dict[str, str] | None, config_text: str) -> Any:
    """`python -m service --config FILE ARGS…` with `config_text` in FILE and its data under tmp_path; stderr piped."""
    config = tmp_path / "config.yaml"
    config.write_text(config_text)
    return await asyncio.create_subprocess_exec(
        sys.executable,
        *("-m", "service", "--config", str(config), *args),
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "AGENT_DATA_DIR": str(tmp_path / "var"), **(env or {})},
    )


async def _start(
    tmp_path: Path, *args: str, env: dict[str, str] | None = None, config_text: str = DEFAULT_CONFIG
) -> tuple[Any, dict[str, Any]]:
    """`python -m service` with `config_text` as its config file, once it logs that it is serving."""
    proc = await _spawn(tmp_path, *args, env=env, config_text=config_text)
    assert proc.stderr is not None
    while True:
        line = await asyncio.wait_for(proc.stderr.readline(), 30)
        assert line, "the service exited before serving"
        record = json.loads(line)
        if record["msg"] == "serving":
            return proc, record


async def test_process_serves_exports_metrics_and_drains_on_sigterm(tmp_path: Path) -> None:
    proc, serving = await _start(
        tmp_path, "--listen", "127.0.0.1:0", env={"AGENT_METRICS_LISTEN": "127.0.0.1:0", "ANTHROPIC_API_KEY": ""}
    )
    try:
        assert serving["model"] == "scripted:demo"
        async with grpc.aio.insecure_channel(f"127.0.0.1:{serving['port']}") as channel:
            reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
            events = await run_events(channel, message="Which shipments are late?")
        final = events[-1].final_response
        assert "query_database answered" in final.text and "search_documents answered" in final.text
        url = f"http://127.0.0.1:{serving['metrics_port']}/metrics"
        metrics = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).read().decode())
        assert 'agent_tool_calls_total{outcome="ok",tool="query_database"} 1.0' in metrics
        assert 'agent_runs_total{outcome="OK"} 1.0' in metrics
        assert "agent_time_to_first_event_seconds_count 1.0" in metrics
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 15) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_bad_config_file_is_a_clear_startup_error(tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("limits:\n  max_turns: zero\n")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "service", "--config", str(config), stderr=asyncio.subprocess.PIPE
    )
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 1
    assert "invalid config" in err.decode() and "max_turns" in err.decode()
    # one line, as the README says (pydantic's own text ran over four, with a link to its docs)
    assert (
        err.decode() == "error: invalid config: limits.max_turns: Input should be a valid integer, unable to parse "
        "string as an integer (got 'zero')\n"
    )


def test_a_config_that_is_not_yaml_is_one_line_too(tmp_path: Path) -> None:
    """An outside finding: a YAML syntax error printed PyYAML's excerpt of the file over five lines."""
    config = tmp_path / "bad.yaml"
    config.write_text("listen: [1,\n")
    with pytest.raises(ConfigError) as error:
        load_config(config)
    assert "\n" not in str(error.value) and "(line 2, column 1)" in str(error.value)


async def _fails_to_start(
    tmp_path: Path, *args: str, env: dict[str, str] | None = None, config_text: str = DEFAULT_CONFIG
) -> str:
    """`python -m service` that must exit at once, non-zero, with a message rather than a traceback: its stderr."""
    proc = await _spawn(tmp_path, *args, env={"ANTHROPIC_API_KEY": "", **(env or {})}, config_text=config_text)
    assert proc.stderr is not None
    lines = []
    try:
        while line := await asyncio.wait_for(proc.stderr.readline(), 30):
            lines.append(line.decode())
            assert '"msg": "serving"' not in lines[-1], f"it started: {lines[-1]}"
        await asyncio.wait_for(proc.wait(), 30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode != 0
    text = "".join(lines)
    assert "Traceback" not in text, text
    return text


@pytest.mark.parametrize(
    ("args", "env", "expected"),
    [
        (["--listen", "127.0.0.1:0"], {"AGENT_METRICS_LISTEN": "garbage"}, "metrics_listen must be HOST:PORT"),
        (["--listen", "127.0.0.1:99999", "--metrics-listen", "127.0.0.1:0"], {}, "listen must be HOST:PORT"),
        (["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"], {"AGENT_LOG_LEVEL": "LOUD"}, "LOUD"),
    ],
)
async def test_bad_addresses_and_log_levels_are_clear_startup_errors(
    tmp_path: Path, args: list[str], env: dict[str, str], expected: str
) -> None:
    assert expected in await _fails_to_start(tmp_path, *args, env=env)


def test_log_level_names_are_case_insensitive(monkeypatch: pytest.MonkeyPatch) -> None:
    assert parse_args(["--log-level", "debug"]).log_level == "DEBUG"
    monkeypatch.setenv("AGENT_LOG_LEVEL", "warning")  # lower case is common in k8s manifests
    assert parse_args([]).log_level == "WARNING"


async def test_a_port_in_use_is_a_clear_startup_error(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        err = await _fails_to_start(tmp_path, "--listen", address, "--metrics-listen", "127.0.0.1:0")
        assert f"cannot listen on {address}" in err
        err = await _fails_to_start(tmp_path, "--listen", "127.0.0.1:0", "--metrics-listen", address)
        assert f"cannot serve metrics on {address}" in err


async def test_what_the_config_names_but_cannot_be_loaded_is_a_clear_startup_error(tmp_path: Path) -> None:
    base = "listen: 127.0.0.1:0\nmetrics_listen: 127.0.0.1:0\n"
    err = await _fails_to_start(tmp_path, config_text=base + "tool_modules: [no_such_tool_module]\n")
    assert "no_such_tool_module" in err
    err = await _fails_to_start(tmp_path, config_text=base + "tools: {shipment_report: {bogus: 1}}\n")
    assert "shipment_report" in err and "bogus" in err
    err = await _fails_to_start(tmp_path, config_text=base + f"model: {{scenario: {tmp_path / 'none.yaml'}}}\n")
    assert "none.yaml" in err


def test_flags_beat_environment_beat_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("listen: 1.1.1.1:1\nmetrics_listen: 2.2.2.2:2\nlimits: {max_message_bytes: 10}\n")
    monkeypatch.setenv("AGENT_LISTEN", "3.3.3.3:3")
    config = load_config(path, listen=None, metrics_listen="4.4.4.4:4")
    assert (config.listen, config.metrics_listen, config.limits.max_message_bytes) == ("3.3.3.3:3", "4.4.4.4:4", 10)
    monkeypatch.delenv("AGENT_LISTEN")
    assert load_config().listen == "0.0.0.0:50051"


def test_unknown_config_keys_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("limits: {max_mesage_bytes: 10}\n")
    with pytest.raises(ConfigError, match="max_mesage_bytes"):
        load_config(path)


STUBBORN_TOOL = """
import asyncio

from pydantic import BaseModel

from tools.base import Tool


class In(BaseModel):
    pass


class Stubborn(Tool[In]):
    name = "stubborn"
    description = "Ignores cancellation."
    Input = In

    async def run(self, args):
        while True:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                pass  # swallowed, which is the point


def create(config):
    return Stubborn()
"""


async def test_sigterm_exits_even_with_a_tool_that_ignores_its_cancellation(tmp_path: Path) -> None:
    """The drain abandons the stuck call; the process must then end rather than wait for it (asyncio.run would)."""
    (tmp_path / "stubborn_tool.py").write_text(STUBBORN_TOOL)
    scenario = tmp_path / "scenario.yaml"
    scenario.write_text("name: stuck\nturns:\n  - tool_calls: [{name: stubborn, input: {}}]\n")
    proc, record = await _start(
        tmp_path,
        "--listen",
        "127.0.0.1:0",
        env={"PYTHONPATH": str(tmp_path), "ANTHROPIC_API_KEY": ""},
        config_text=f"model: {{scenario: {scenario}}}\ntool_modules: [stubborn_tool]\nshutdown_grace_s: 0.2\n"
        "metrics_listen: 127.0.0.1:0\n",
    )
    assert proc.stderr is not None
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{record['port']}") as channel:
            call = stub(channel).RunAgent(pb.RunAgentRequest(message="go"))
            async for event in call:
                if event.HasField("tool_call_ready"):
                    break
            await asyncio.sleep(0.1)  # the tool is running
            proc.send_signal(signal.SIGTERM)
            rest = (await asyncio.wait_for(proc.stderr.read(), 15)).decode()
            assert await asyncio.wait_for(proc.wait(), 5) == 0
        assert "exiting without waiting for tasks that ignored their cancellation" in rest
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


TESTS_DIR = Path(__file__).parent


async def test_tools_options_reach_a_tool_module_named_otherwise_than_its_tool(tmp_path: Path) -> None:
    """`tool_modules: [probe_tool]` builds the tool `probe`; its options are `tools.probe`, as documented."""
    scenario = tmp_path / "scenario.yaml"
    scenario.write_text("name: probe\nturns:\n  - tool_calls: [{name: probe, input: {}}]\n  - text: done\n")
    proc, record = await _start(
        tmp_path,
        "--listen",
        "127.0.0.1:0",
        env={
            "PYTHONPATH": os.pathsep.join([str(TESTS_DIR), os.environ.get("PYTHONPATH", "")]),
            "ANTHROPIC_API_KEY": "",
        },
        config_text=f"model: {{scenario: {scenario}}}\ntool_modules: [probe_tool]\nmetrics_listen: 127.0.0.1:0\n"
        "tools:\n  probe: {reply: from the config}\n",
    )
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{record['port']}") as channel:
            events = await run_events(channel, message="go", tools=["probe"])
        results = [e.tool_result for e in events if e.HasField("tool_result")]
        assert [(r.name, r.data.struct_value["reply"]) for r in results] == [("probe", "from the config")]
    finally:
        proc.kill()
        await proc.wait()


def test_tool_options_that_cannot_be_placed_are_clear_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tools import load_tools

    with pytest.raises(ValueError, match="tools.probe and tools.probe_tool all name module probe_tool"):
        load_tools(tmp_path, {"probe": {}, "probe_tool": {}}, extra_modules=["probe_tool"])
    with pytest.raises(ValueError, match="unknown tools: nope"):
        load_tools(tmp_path, {"nope": {}}, extra_modules=["probe_tool"])
    # the module name still works, as before
    tools = load_tools(tmp_path, {"probe_tool": {"reply": "by module"}}, extra_modules=["probe_tool"])
    assert tools["probe"].reply == "by module"  # type: ignore[attr-defined]
    # a module building a tool whose class it imports cannot be matched by the tool's name: said so, not "unknown"
    (tmp_path / "reexport_tool.py").write_text(
        "from probe_tool import Probe\n\ndef create(config):\n    return Probe('x')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ValueError, match="builds tool 'probe' from a class defined elsewhere.*tools.reexport_tool"):
        load_tools(tmp_path, {"probe": {}}, extra_modules=["reexport_tool"])


def _demo_shape(output: str) -> list[str]:
    """The tool lines of a rendered demo run (results, retries, fallbacks) and its summary, times left out, in a fixed
    order: the four calls run concurrently and their lines interleave differently from run to run."""
    lines = [line for line in output.splitlines() if line[:1] in ("←", "↻", "⇢", "—")]
    return sorted(re.sub(r"\d+ ms", "_ ms", line) for line in lines)


def _readme_demo() -> str:
    readme = (TESTS_DIR.parent / "README.md").read_text()
    start = readme.index("\nrun run_")
    return readme[start : readme.index("```", start)]


async def test_the_readme_demo_gives_the_same_output_every_time(tmp_path: Path) -> None:
    """The README's demo, run again and again against one server: the same retries, fallback and results each time
    (the carrier API's failures once opened the tracker's circuit on the second run). From the second run on,
    search_documents answers from its cache, as the README says."""
    proc, serving = await _start(
        tmp_path, "--listen", "127.0.0.1:0", env={"ANTHROPIC_API_KEY": "", "AGENT_METRICS_LISTEN": "127.0.0.1:0"}
    )
    readme = _demo_shape(_readme_demo())
    cached = sorted(
        re.sub(r"search_documents ok in _ ms \((\d+) bytes\)", r"search_documents ok in _ ms (\1 bytes, cached)", line)
        for line in readme
    )
    assert any("falling back" in line for line in readme) and any("retry 2/3" in line for line in readme)
    try:
        for i in range(5):
            code, out, err = await cli(serving["port"], "Which shipments are late?")
            assert code == 0, err
            assert _demo_shape(out) == (readme if i == 0 else cached), f"run {i + 1}:\n{out}"
    finally:
        proc.kill()
        await proc.wait()
