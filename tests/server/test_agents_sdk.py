"""The OpenAI Agents SDK, unmodified, runs an agent loop against the server: its Responses model sends the
question, the server answers with a call of the agent's function tool (the model's text scripted, the rest real),
the SDK runs the tool and sends its result back, and the server's next answer is the agent's final output;
whole and streamed, on both families, and through the SDK's chat-completions model too."""

from __future__ import annotations

import pytest

from .scripted import Scripted
from .test_tools_api import call_of


def agent_for(srv, calls: list, chat: bool = False):
    from agents import Agent, OpenAIChatCompletionsModel, OpenAIResponsesModel, function_tool, set_tracing_disabled
    from openai import AsyncOpenAI

    set_tracing_disabled(True)  # nothing leaves the machine

    @function_tool
    def get_weather(city: str, days: int) -> str:
        """The weather in a city for the next days."""
        calls.append((city, days))
        return f"Sunny in {city} for {days} days."

    client = AsyncOpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)
    model = (OpenAIChatCompletionsModel if chat else OpenAIResponsesModel)(model="tiny", openai_client=client)
    return Agent(name="weather", instructions="Answer briefly.", tools=[get_weather], model=model)


def replies(srv) -> tuple[str, str]:
    lead = "Let me check.\n" + ("\n" if "<function=" in call_of(srv) else "")
    return lead + call_of(srv), "It is sunny in Paris."


@pytest.fixture
def prompts(srv, monkeypatch):
    """The prompts the engine is given, as text."""
    engine = srv.state.model.engine
    seen: list[str] = []
    submit = engine.submit

    def record(request_id, prompt_ids, *args, **kwargs):
        seen.append(srv.state.model.tokenizer.decode(prompt_ids))
        return submit(request_id, prompt_ids, *args, **kwargs)

    monkeypatch.setattr(engine, "submit", record)
    return seen


@pytest.mark.parametrize("api", ["responses", "chat"])
async def test_an_agent_calls_its_tool_and_answers(srv, api, prompts):
    from agents import Runner

    calls: list = []
    with Scripted(srv) as script:
        script.then(*replies(srv))
        result = await Runner.run(agent_for(srv, calls, chat=api == "chat"), "Weather in Paris for 3 days?")
    assert calls == [("Paris", 3)]  # the SDK parsed the server's call and ran the tool
    assert result.final_output == "It is sunny in Paris."
    # two requests: the question, then the call and the tool's result, as the model's template shows them
    first, second = prompts
    assert "Answer briefly." in first and "get_weather" in first
    assert second.startswith(first) and "<tool_response>\nSunny in Paris for 3 days.\n</tool_response>" in second


async def test_an_agent_streamed(srv):
    from agents import Runner

    calls: list = []
    with Scripted(srv) as script:
        script.then(*replies(srv))
        run = Runner.run_streamed(agent_for(srv, calls), "Weather in Paris for 3 days?")
        kinds = [ev.type async for ev in run.stream_events()]
    assert calls == [("Paris", 3)] and run.final_output == "It is sunny in Paris."
    assert "raw_response_event" in kinds and "run_item_stream_event" in kinds
