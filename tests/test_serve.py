"""`smolforge serve`: the official `openai` client against live servers on 127.0.0.1, bad
requests answered 400 with OpenAI's error body, 32 concurrent streaming clients, and the
pure reply-building pieces (reasoning split, tool-call parsing) on hand-written replies.

Two models serve the live tests:
- a random tiny model (chatml template): greedy replies are compared with `Engine.generate`
  on the same prompt, the parity that continuous batching must keep;
- a "scripted" tiny model whose weights make its greedy reply a fixed token chain, so the
  reasoning and tool-call paths are checked end to end on a known reply: every layer's
  output projections are zero, so the residual stream is the current token's embedding, and
  each chain token's embedding is a basis vector that the LM head maps to the next one.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

from smolforge.chat.reasoning import split_reasoning
from smolforge.chat.render import load_template, render_messages
from smolforge.engine import Engine, SamplingParams
from smolforge.model import Transformer, debug
from smolforge.serve.replies import ChatStreamAssembler, chat_reply
from smolforge.serve.tools import parse_tool_calls, tools_variable
from smolforge.tokenizer import Tokenizer

openai = pytest.importorskip("openai")  # the `test` extra installs it; CI runs these tests
from smolforge.serve.app import RunningServer, create_app, validation_message  # noqa: E402

API_KEY = "test-key"
VOCAB = 384
REASONING = "I should check the weather."
PREAMBLE = "Let me look."
CALL = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


# ---- fixtures -----------------------------------------------------------------------------------


def chat_tokenizer(tokenizer: Tokenizer, template: str | None) -> Tokenizer:
    """A copy of the session tokenizer with the given chat template."""
    return Tokenizer(tokenizer.backend, eos_token=tokenizer.eos_token, pad_token=tokenizer.pad_token,
                     chat_template=template)


@pytest.fixture(scope="module")
def random_model() -> Transformer:
    torch.manual_seed(0)  # init_std 0.2: replies vary with the prompt (the default repeats)
    return Transformer(debug().model_copy(update={"vocab_size": VOCAB, "init_std": 0.2})).eval()


@pytest.fixture(scope="module")
def chatml(tokenizer) -> Tokenizer:
    return chat_tokenizer(tokenizer, load_template("chatml"))


@pytest.fixture(scope="module")
def server(random_model, chatml):
    """The random model behind an API key; up to 32 requests per batch."""
    with RunningServer(create_app(random_model, chatml, model_name="tiny", api_key=API_KEY)) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def scripted(tmp_path_factory, tokenizer):
    """(tokenizer, model) whose greedy reply to any smollm3 prompt is
    <think>REASONING</think>PREAMBLE<tool_call>CALL</tool_call><|im_end|>."""
    tok = Tokenizer.load(_saved(tokenizer, tmp_path_factory.mktemp("scripted-tok")))
    tok.backend.add_tokens([REASONING, PREAMBLE, CALL])
    tok.chat_template = load_template("smollm3")
    assert tok.vocab_size <= VOCAB
    ids = {text: tok.token_to_id(text) for text in
           ("<think>", REASONING, "</think>", PREAMBLE, "<tool_call>", CALL, "</tool_call>", "<|im_end|>")}
    last_prompt_tokens = {tok.encode(render_messages(tok.chat_template, [{"role": "user", "content": "hi"}],
                                                     add_generation_prompt=True, enable_thinking=flag))[-1]
                          for flag in (True, False)}
    assert len(last_prompt_tokens) == 1  # both generation prompts end with the same "\n" token
    chain = [*last_prompt_tokens, *ids.values()]
    assert len(set(chain)) == len(chain)
    cfg = debug().model_copy(update={"vocab_size": VOCAB, "tie_embeddings": False, "max_seq_len": 1024})
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    with torch.no_grad():
        for block in model.model.layers:
            block.self_attn.o_proj.weight.zero_()
            block.mlp.down_proj.weight.zero_()
        embed, head = model.model.embed_tokens.weight, model.lm_head.weight
        head.zero_()
        for i, (token, following) in enumerate(itertools.pairwise(chain)):
            embed[token] = 0.0
            embed[token, i] = 1.0
            head[following, i] = 10.0
    return tok, model


def _saved(tokenizer: Tokenizer, directory: Path) -> Path:
    tokenizer.save(directory)
    return directory


@pytest.fixture(scope="module")
def scripted_client(scripted):
    tok, model = scripted
    with RunningServer(create_app(model, tok, model_name="scripted")) as running:
        yield openai.OpenAI(base_url=f"{running.url}/v1", api_key="unused", max_retries=0, timeout=60)


def post(url: str, body: bytes | dict, key: str | None = API_KEY) -> tuple[int, dict]:
    """Raw POST (the openai client validates some things itself): (status, JSON body)."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    request = urllib.request.Request(url, data=data, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def get(url: str, key: str | None = API_KEY) -> tuple[int, dict]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def solo(model: Transformer, tok: Tokenizer, prompt: list[int], max_tokens: int,
         stop_ids: tuple[int, ...] = ()):
    """The reference: the prompt generated alone by the engine, greedy."""
    params = SamplingParams(max_new_tokens=max_tokens, temperature=0, stop_token_ids=list(stop_ids))
    return Engine(model, tok).generate([prompt], params)[0]


def chat_prompt(tok: Tokenizer, messages: list[dict], **kwargs) -> list[int]:
    return tok.encode(render_messages(tok.chat_template, messages, add_generation_prompt=True,
                                      eos_token=tok.eos_token, pad_token=tok.pad_token, **kwargs))


# ---- the live server: OpenAI client ---------------------------------------------------------------


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert client.models.retrieve("tiny").owned_by == "smolforge"
    assert get(f"{server.url}/health", key=None) == (200, {"status": "ok", "model": "tiny"})
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.models.retrieve("gpt-4o")


def test_chat_completion_equals_engine_greedy(random_model, chatml, client):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the quick brown fox"}]
    reply = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0)
    im_end = chatml.token_to_id("<|im_end|>")
    prompt = chat_prompt(chatml, messages)
    reference = solo(random_model, chatml, prompt, 12, (im_end,))
    choice = reply.choices[0]
    assert reply.object == "chat.completion" and reply.id.startswith("chatcmpl-") and reply.model == "tiny"
    assert choice.index == 0 and choice.message.role == "assistant"
    assert choice.message.content == reference.text
    assert choice.finish_reason == reference.finish_reason
    assert choice.message.reasoning_content is None and choice.message.tool_calls is None
    assert reply.usage.prompt_tokens == len(prompt)
    assert reply.usage.completion_tokens == len(reference.tokens)
    assert reply.usage.total_tokens == len(prompt) + len(reference.tokens)


def test_developer_role_and_max_completion_tokens(client):
    """OpenAI's newer names: "developer" renders as "system", max_completion_tokens as max_tokens."""
    def ask(role: str, **limit) -> object:
        return client.chat.completions.create(
            model="tiny", messages=[{"role": role, "content": "be brief"}, {"role": "user", "content": "hi"}],
            temperature=0, extra_body={"ignore_eos": True}, **limit)

    system, developer = ask("system", max_tokens=5), ask("developer", max_completion_tokens=5)
    assert developer.usage.prompt_tokens == system.usage.prompt_tokens
    assert developer.choices[0].message.content == system.choices[0].message.content
    assert developer.usage.completion_tokens <= 5


def test_streamed_chat_joins_to_the_whole_reply(client):
    messages = [{"role": "user", "content": "over the lazy dog"}]
    whole = client.chat.completions.create(model="tiny", messages=messages, max_tokens=16, temperature=0)
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=16,
                                                 temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == whole.usage.model_dump() | {
        "completion_tokens_details": None, "prompt_tokens_details": None}


def test_completions_whole_streamed_and_echo(random_model, chatml, client):
    prompt = "the lazy dog 0123"
    reference = solo(random_model, chatml, chatml.encode(prompt), 10)
    whole = client.completions.create(model="tiny", prompt=prompt, max_tokens=10, temperature=0)
    assert whole.object == "text_completion" and whole.choices[0].text == reference.text
    assert whole.choices[0].finish_reason == reference.finish_reason
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens) == (len(chatml.encode(prompt)),
                                                                          len(reference.tokens))
    streamed = list(client.completions.create(model="tiny", prompt=prompt, max_tokens=10,
                                              temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == reference.text
    assert streamed[-1].choices[0].finish_reason == reference.finish_reason
    echoed = client.completions.create(model="tiny", prompt=prompt, max_tokens=10, temperature=0, echo=True)
    assert echoed.choices[0].text == prompt + reference.text
    by_ids = client.completions.create(model="tiny", prompt=chatml.encode(prompt), max_tokens=10, temperature=0)
    assert by_ids.choices[0].text == reference.text


def test_sampling_with_a_seed_repeats(client):
    args = dict(model="tiny", prompt="the quick", max_tokens=8, temperature=1.0, top_p=0.9, seed=7,
                extra_body={"top_k": 50, "min_p": 0.01, "repetition_penalty": 1.1})
    first = client.completions.create(**args)
    assert client.completions.create(**args).choices[0].text == first.choices[0].text


def test_stop_string_cuts_the_reply(random_model, chatml, client):
    prompt = "the lazy dog 0123"
    reference = solo(random_model, chatml, chatml.encode(prompt), 12)
    # A piece of the known greedy reply (plain ASCII: the random model also emits broken UTF-8).
    text = reference.text
    cut = next(text[i:i + 2] for i in range(1, len(text) - 1)
               if text[i:i + 2].isascii() and text[i:i + 2].isprintable())
    reply = client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0, stop=[cut])
    assert reply.choices[0].text == reference.text[:reference.text.index(cut)]
    assert reply.choices[0].finish_reason == "stop"


# ---- reasoning and tools, on the scripted model ----------------------------------------------------


def test_reasoning_content_is_split_from_the_reply(scripted, scripted_client):
    tok, model = scripted
    messages = [{"role": "user", "content": "weather in Paris?"}]
    reply = scripted_client.chat.completions.create(model="scripted", messages=messages, max_tokens=20,
                                                    temperature=0)
    raw = solo(model, tok, chat_prompt(tok, messages), 20, (tok.token_to_id("<|im_end|>"),))
    reasoning, answer = split_reasoning(raw.text)
    message = reply.choices[0].message
    assert message.reasoning_content == reasoning == REASONING
    assert message.content == answer == f"{PREAMBLE}<tool_call>{CALL}</tool_call>"
    assert message.tool_calls is None and reply.choices[0].finish_reason == "stop"

    chunks = list(scripted_client.chat.completions.create(model="scripted", messages=messages,
                                                          max_tokens=20, temperature=0, stream=True))
    deltas = [c.choices[0].delta for c in chunks]
    streamed_reasoning = "".join(getattr(d, "reasoning_content", None) or "" for d in deltas)
    assert streamed_reasoning == REASONING
    assert "".join(d.content or "" for d in deltas) == answer
    first_content = next(i for i, d in enumerate(deltas) if d.content)
    assert all(not getattr(d, "reasoning_content", None) for d in deltas[first_content:])


def test_chat_template_kwargs_reach_the_template(scripted, scripted_client):
    tok, _ = scripted
    messages = [{"role": "user", "content": "hi"}]
    thinking = scripted_client.chat.completions.create(model="scripted", messages=messages, max_tokens=3)
    plain = scripted_client.chat.completions.create(
        model="scripted", messages=messages, max_tokens=3,
        extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    assert thinking.usage.prompt_tokens == len(chat_prompt(tok, messages))
    assert plain.usage.prompt_tokens == len(chat_prompt(tok, messages, enable_thinking=False))
    assert plain.usage.prompt_tokens != thinking.usage.prompt_tokens


def test_tool_calls_are_rendered_and_parsed(scripted, scripted_client):
    tok, _ = scripted
    messages = [{"role": "user", "content": "weather in Paris?"}]
    reply = scripted_client.chat.completions.create(model="scripted", messages=messages, max_tokens=20,
                                                    temperature=0, tools=[WEATHER_TOOL])
    # The schemas were rendered into the prompt (the smollm3 template's tools section).
    assert reply.usage.prompt_tokens == len(chat_prompt(tok, messages, tools=[WEATHER_TOOL]))
    assert reply.usage.prompt_tokens > len(chat_prompt(tok, messages))
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == PREAMBLE and choice.message.reasoning_content == REASONING
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}

    # The conversation continues with the call and its result (rendered, not refused).
    follow_up = messages + [choice.message.model_dump(exclude_none=True),
                            {"role": "tool", "tool_call_id": call.id, "content": '{"temp_c": 21}'}]
    again = scripted_client.chat.completions.create(model="scripted", messages=follow_up, max_tokens=20,
                                                    temperature=0, tools=[WEATHER_TOOL])
    assert again.usage.prompt_tokens == len(chat_prompt(tok, [
        *messages, {"role": "assistant", "content": PREAMBLE, "reasoning_content": REASONING,
                    "tool_calls": [{"id": call.id, "type": "function", "function": {
                        "name": "get_weather", "arguments": call.function.arguments}}]},
        {"role": "tool", "tool_call_id": call.id, "content": '{"temp_c": 21}'}], tools=[WEATHER_TOOL]))

    chunks = list(scripted_client.chat.completions.create(model="scripted", messages=messages, max_tokens=20,
                                                          temperature=0, tools=[WEATHER_TOOL], stream=True))
    calls = [t for c in chunks for t in (c.choices[0].delta.tool_calls or [])]
    assert [(t.index, t.function.name, json.loads(t.function.arguments)) for t in calls] == \
        [(0, "get_weather", {"city": "Paris"})]
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == PREAMBLE
    assert chunks[-1].choices[0].finish_reason == "tool_calls"

    off = scripted_client.chat.completions.create(model="scripted", messages=messages, max_tokens=20,
                                                  temperature=0, tools=[WEATHER_TOOL], tool_choice="none")
    assert off.choices[0].message.tool_calls is None and off.choices[0].finish_reason == "stop"


# ---- bad requests ----------------------------------------------------------------------------------

GOOD = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
BAD_CHAT = [
    (b'{"messages": [', None, "not valid JSON"),
    (b"", None, "body is missing"),
    ({"model": "tiny"}, "messages", "Field required"),
    ({**GOOD, "messages": []}, "messages", "at least 1 item"),
    ({**GOOD, "messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role", "'user'"),
    ({**GOOD, "messages": [{"role": "user"}]}, "messages[0]", "content is missing"),
    ({**GOOD, "messages": "hi"}, "messages", "valid list"),
    ({**GOOD, "messages": [{"role": "user", "content": "fox " * 400}]}, "messages", "context is 256"),
    ({**GOOD, "max_tokens": 500}, "max_tokens", "exceeds the model's context (256 tokens)"),
    ({**GOOD, "max_tokens": 0}, "max_tokens", "at least 1"),
    ({**GOOD, "temperature": -0.5}, "temperature", ">= 0"),
    ({**GOOD, "temperature": "hot"}, "temperature", "valid number"),
    ({**GOOD, "top_p": 0}, "top_p", "(0, 1]"),
    ({**GOOD, "top_p": 1.5}, "top_p", "(0, 1]"),
    ({**GOOD, "top_k": -1}, "top_k", ">= 0"),
    ({**GOOD, "stop": [""]}, "stop", "non-empty"),
    ({**GOOD, "n": 2}, "n", "n must be 1"),
    ({**GOOD, "stream": "maybe"}, "stream", "valid boolean"),
    ({**GOOD, "presence_penalty": 0.5}, "presence_penalty", "not supported"),
    ({**GOOD, "logprobs": True}, "logprobs", "not supported"),
    ({**GOOD, "response_format": {"type": "json_object"}}, "response_format", "Extra inputs"),
    ({**GOOD, "tools": [WEATHER_TOOL]}, "tools", "no place for tools"),
    ({**GOOD, "tool_choice": "required", "tools": [WEATHER_TOOL]}, "tool_choice", "'auto' or 'none'"),
    ({**GOOD, "chat_template_kwargs": {"messages": []}}, "chat_template_kwargs", "may not set"),
    ({**GOOD, "chat_template_kwargs": "x"}, "chat_template_kwargs", "valid dictionary"),
]


@pytest.mark.parametrize(("body", "param", "message"), BAD_CHAT, ids=range(len(BAD_CHAT)))
def test_bad_chat_request_is_400_and_the_server_goes_on(server, body, param, message):
    status, reply = post(f"{server.url}/v1/chat/completions", body)
    assert status == 400, reply
    assert set(reply) == {"error"} and reply["error"]["type"] == "invalid_request_error"
    assert message in reply["error"]["message"] and reply["error"]["param"] == param
    assert reply["error"]["code"] in (None, "context_length_exceeded")
    status, good = post(f"{server.url}/v1/chat/completions", GOOD)
    assert status == 200 and good["choices"][0]["finish_reason"] in ("stop", "length")


@pytest.mark.parametrize(("body", "param", "message"), [
    ({"model": "tiny", "prompt": "hi", "max_tokens": 300}, "max_tokens", "exceeds"),
    ({"model": "tiny", "prompt": ""}, "prompt", "empty"),
    ({"model": "tiny", "prompt": ["a", "b"]}, "prompt", "send one per request"),
    ({"model": "tiny", "prompt": [5, 9999]}, "prompt", "outside the vocabulary"),
    ({"model": "tiny", "prompt": "hi", "suffix": "x"}, "suffix", "not supported"),
    ({"model": "tiny", "prompt": "hi", "min_p": 1.0}, "min_p", "[0, 1)"),
    ({"model": "tiny", "prompt": "hi", "repetition_penalty": 0}, "repetition_penalty", "> 0"),
])
def test_bad_completion_request_is_400(server, body, param, message):
    status, reply = post(f"{server.url}/v1/completions", body)
    assert status == 400 and message in reply["error"]["message"] and reply["error"]["param"] == param


def test_openai_client_raises_bad_request_with_the_message(client):
    with pytest.raises(openai.BadRequestError, match="temperature must be >= 0") as caught:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}],
                                       temperature=-1)
    assert caught.value.status_code == 400 and caught.value.param == "temperature"
    assert client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}],
                                          max_tokens=2).choices[0].message.role == "assistant"


def test_api_key_is_required_on_v1_routes(server):
    for key in (None, "wrong-key"):
        status, reply = post(f"{server.url}/v1/chat/completions", GOOD, key=key)
        assert status == 401 and reply["error"]["code"] == "invalid_api_key"
        assert get(f"{server.url}/v1/models", key=key)[0] == 401
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="nope", max_retries=0).models.list()
    assert get(f"{server.url}/health", key=None)[0] == 200


def test_unknown_model_and_route(server):
    status, reply = post(f"{server.url}/v1/chat/completions", {**GOOD, "model": "other"})
    assert status == 404 and reply["error"]["code"] == "model_not_found" and reply["error"]["param"] == "model"
    status, reply = get(f"{server.url}/v1/nothing")
    assert status == 404 and "error" in reply


def test_chat_without_a_template_points_to_completions(random_model, tokenizer):
    bare = chat_tokenizer(tokenizer, None)
    with RunningServer(create_app(random_model, bare, model_name="base")) as running:
        status, reply = post(f"{running.url}/v1/chat/completions", {**GOOD, "model": "base"}, key=None)
        assert status == 400 and "/v1/completions" in reply["error"]["message"]
        status, reply = post(f"{running.url}/v1/completions",
                             {"model": "base", "prompt": "the", "max_tokens": 3}, key=None)
        assert status == 200 and reply["usage"]["completion_tokens"] >= 1


def test_validation_message_names_the_field():
    message, param = validation_message([
        {"type": "literal_error", "loc": ("body", "messages", 2, "role"), "msg": "Input should be 'user'"},
        {"type": "value_error", "loc": ("body", "n"), "msg": "Value error, n must be 1"}])
    assert param == "messages[2].role"
    assert message == "messages[2].role: Input should be 'user'; n: n must be 1"


# ---- load: continuous batching ----------------------------------------------------------------------


def test_32_concurrent_streaming_clients_match_solo_generation(random_model, chatml, server):
    questions = [f"question {i}: " + "the quick brown fox " * (i % 5) for i in range(32)]
    im_end = chatml.token_to_id("<|im_end|>")

    async def one(client, question: str) -> tuple[str, str | None]:
        stream = await client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": question}], max_tokens=8,
            temperature=0, stream=True)
        text, finish = "", None
        async for chunk in stream:
            text += chunk.choices[0].delta.content or ""
            finish = chunk.choices[0].finish_reason or finish
        return text, finish

    async def all_clients():
        client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=120)
        async with client:
            return await asyncio.gather(*(one(client, q) for q in questions))

    results = asyncio.run(all_clients())
    for question, (text, finish) in zip(questions, results):
        reference = solo(random_model, chatml, chat_prompt(chatml, [{"role": "user", "content": question}]),
                         8, (im_end,))
        assert (text, finish) == (reference.text, reference.finish_reason)


@pytest.mark.parametrize("stream", [True, False])
def test_disconnected_client_leaves_the_batch(server, random_model, monkeypatch, stream):
    forward = random_model.forward

    def slow_forward(*args, **kwargs):  # 250 steps take > 5 s: the request cannot finish first
        time.sleep(0.02)
        return forward(*args, **kwargs)

    monkeypatch.setattr(random_model, "forward", slow_forward)
    body = json.dumps({"model": "tiny", "prompt": "the", "max_tokens": 250, "stream": stream,
                       "ignore_eos": True}).encode()
    batcher = server._server.config.app.state.server.batcher
    with socket.create_connection((server.host, server.port), timeout=60) as connection:
        connection.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: test\r\n"
                           b"Content-Type: application/json\r\n"
                           + f"Authorization: Bearer {API_KEY}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
                           + body)
        deadline = time.monotonic() + 30
        while not batcher._rows:
            assert time.monotonic() < deadline, "the request never started"
            time.sleep(0.01)
        (running,) = batcher._rows
        received = b""
        while stream and b"data: " not in received:  # the headers may come in a packet of their own
            assert time.monotonic() < deadline, received
            received += connection.recv(4096)
    deadline = time.monotonic() + 4
    while batcher._rows or batcher._joining or batcher._waiting:
        assert time.monotonic() < deadline, "the request went on decoding after its client left"
        time.sleep(0.05)
    assert running.stream.cancelled and running.generated < 200


# ---- pure pieces: tool calls and the reply split -----------------------------------------------------


def test_tools_variable_of_the_templates():
    assert tools_variable(load_template("smollm3")) == "tools"
    assert tools_variable(load_template("chatml")) is None
    assert tools_variable("{% for t in xml_tools %}{{ t }}{% endfor %}{{ messages[0].content }}") == "xml_tools"


@pytest.mark.parametrize(("reply", "content", "calls"), [
    ('<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call>', "", [("f", {"x": 1})]),
    ('Sure.\n<tool_call>{"name": "f", "arguments": {}}</tool_call>\n<tool_call>{"name": "g", '
     '"parameters": {"y": "é"}}</tool_call>', "Sure.\n\n", [("f", {}), ("g", {"y": "é"})]),
    ('<tool_call>{"name": "f", "arguments": "{\\"x\\": 2}"}</tool_call>', "", [("f", {"x": 2})]),
    ("<tool_call>not json</tool_call> ok", "<tool_call>not json</tool_call> ok", []),
    ('<tool_call>{"arguments": {}}</tool_call>', '<tool_call>{"arguments": {}}</tool_call>', []),
    ('cut <tool_call>{"name": "f", "argu', 'cut <tool_call>{"name": "f", "argu', []),
    ("a < b <tool_", "a < b <tool_", []),
])
def test_parse_tool_calls_whole_and_in_every_split(reply, content, calls):
    got_content, got_calls = parse_tool_calls(reply)
    assert got_content == content
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in got_calls] == calls
    assert all(c["type"] == "function" and c["id"].startswith("call_") for c in got_calls)
    assert len({c["id"] for c in got_calls}) == len(got_calls)


REPLIES = [
    "plain answer  ",
    "  <think>\n step one \n</think>\n\nThe answer is 4.\n",
    "<think>unfinished reasoning",
    "<think></think>no reasoning",
    f"<think> plan </think> {PREAMBLE}\n<tool_call>\n{CALL}\n</tool_call>\n",
    '<tool_call>{"name": "f", "arguments": {}}</tool_call>',
    "answer with <think> later and <tool_call>broken</tool_call> text ",
]


@pytest.mark.parametrize("reply", REPLIES)
@pytest.mark.parametrize("tools", [False, True])
@pytest.mark.parametrize("in_think", [False, True])
def test_streamed_reply_pieces_join_to_the_whole_reply(reply, tools, in_think):
    whole = chat_reply(reply, "stop", in_think=in_think, tools=tools)
    expected_reasoning, _ = split_reasoning(reply, in_think)
    assert whole.reasoning_content == expected_reasoning
    chunkings = [[reply], list(reply)] + [[reply[:i], reply[i:j], reply[j:]]
                                          for i in range(0, len(reply), 3) for j in range(i, len(reply), 5)]
    for pieces in chunkings:
        assembler = ChatStreamAssembler(in_think=in_think, tools=tools)
        deltas = [assembler.feed(p) for p in pieces]
        last, finish = assembler.finish("stop")
        deltas = [d for d in [*deltas, last] if d]
        assert "".join(d.get("reasoning_content", "") for d in deltas) == (whole.reasoning_content or "")
        assert "".join(d.get("content", "") for d in deltas) == (whole.content or "")
        streamed_calls = [c for d in deltas for c in d.get("tool_calls", [])]
        assert [c["index"] for c in streamed_calls] == list(range(len(whole.tool_calls)))
        assert [c["function"] for c in streamed_calls] == [c["function"] for c in whole.tool_calls]
        assert finish == whole.finish_reason


def test_chat_reply_fields():
    reply = chat_reply(f"<think>\nhmm\n</think>\n{PREAMBLE}\n<tool_call>\n{CALL}\n</tool_call>", "stop",
                       in_think=False, tools=True)
    assert (reply.reasoning_content, reply.content, reply.finish_reason) == ("hmm", PREAMBLE, "tool_calls")
    assert reply.tool_calls[0]["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    only_call = chat_reply(f"<tool_call>{CALL}</tool_call>", "stop", in_think=False, tools=True)
    assert only_call.content is None and only_call.finish_reason == "tool_calls"
    cut = chat_reply(f"<tool_call>{CALL}</tool_call> and", "length", in_think=False, tools=True)
    assert cut.finish_reason == "length" and cut.content == "and"
    thinking = chat_reply("still thinking", "length", in_think=True, tools=False)
    assert (thinking.reasoning_content, thinking.content) == ("still thinking", "")
    untouched = chat_reply(f"<tool_call>{CALL}</tool_call>", "stop", in_think=False, tools=False)
    assert untouched.content == f"<tool_call>{CALL}</tool_call>" and not untouched.tool_calls


# ---- the command ------------------------------------------------------------------------------------


def test_cli_registers_serve_without_importing_fastapi():
    code = ("import sys; from smolforge.cli import build_parser; p = build_parser(); "
            "assert 'fastapi' not in sys.modules and 'uvicorn' not in sys.modules; "
            "p.parse_args(['serve', 'ckpt', '--port', '9', '--api-key', 'k'])")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_cli_serves_a_checkpoint(tmp_path, random_model, chatml):
    from smolforge.train.checkpoint import save_checkpoint

    save_checkpoint(tmp_path / "ckpt", random_model, chatml)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "SMOLFORGE_API_KEY": "from-env"}
    process = subprocess.Popen([sys.executable, "-m", "smolforge.cli", "serve", str(tmp_path / "ckpt"),
                                "--port", str(port), "--device", "cpu", "--temperature", "0"],
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 120
        while True:
            try:
                if get(f"{url}/health", key=None)[0] == 200:
                    break
            except OSError:
                pass
            assert process.poll() is None and time.monotonic() < deadline, process.stdout.read()
            time.sleep(0.2)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="from-env", max_retries=0)
        assert client.models.list().data[0].id == "ckpt"
        reply = client.chat.completions.create(model="ckpt", messages=[{"role": "user", "content": "hi"}],
                                               max_tokens=6)
        prompt = chat_prompt(chatml, [{"role": "user", "content": "hi"}])
        reference = solo(random_model, chatml, prompt, 6, (chatml.token_to_id("<|im_end|>"),))
        assert reply.choices[0].message.content == reference.text  # --temperature 0 is the default
    finally:
        process.terminate()
        process.wait(timeout=60)
