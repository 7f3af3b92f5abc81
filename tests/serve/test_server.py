"""nqserve through the official `openai` client (and raw HTTP for what a client library would not send): both
endpoints whole and streamed, stop strings, seeds, agreement with the runtime, every refused input, a client that
leaves mid-stream, and 16 concurrent streams."""
from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time

import httpx
import numpy as np
import openai
import pytest

import runtime
from nqserve.app import MAX_BODY_BYTES
from nqserve.text_output import TextOutput
from runtime.generate import GenerationStats, text_pieces

PROMPTS = ["Hello", "The cat", "abc def", "Once upon", "x", "12345", "zz top", "Quick brown", "Lorem ipsum",
           "foo bar baz", "A", "To be or", "Numbers: 1 2", "end.", "What is", "Tiny model"]
LONG = "The cat sat on the mat. " * 14  # 336 tokens: prefilled in several slices
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."}, {"role": "user", "content": "Another?"}]


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=server.api_key, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def lm(server):
    return runtime.load(server.path, backend="numba", threads=1)


def streamed(chunks, chat: bool) -> tuple[str, str | None, object]:
    """Text, finish reason and usage of a stream of chunks."""
    text, finish, usage = [], None, None
    for c in chunks:
        if c.usage is not None:
            usage = c.usage
        for choice in c.choices:
            piece = choice.delta.content if chat else choice.text
            text.append(piece or "")
            finish = choice.finish_reason or finish
    return "".join(text), finish, usage


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == [server.model_id]
    health = server.health()
    assert health["status"] == "ok" and health["parallel"] == 8


def test_greedy_completion_equals_runtime_generate(server, client, lm):
    """Short prompts, and one long enough to be prefilled in several slices between other requests' steps."""
    for prompt in PROMPTS[:4] + [LONG]:
        want = lm.generate(prompt, max_tokens=40, temperature=0)
        got = client.completions.create(model=server.model_id, prompt=prompt, max_tokens=40, temperature=0)
        choice = got.choices[0]
        assert choice.text == want
        assert choice.finish_reason == ("length" if lm.stats.stop_reason == "max tokens" else "stop")
        assert got.usage.prompt_tokens == len(lm.tokenize(prompt))
        assert got.usage.completion_tokens == lm.stats.generated_tokens
        assert got.usage.total_tokens == got.usage.prompt_tokens + got.usage.completion_tokens


def test_greedy_chat_equals_runtime_chat(server, client, lm):
    want = lm.chat(CHAT, max_tokens=50, temperature=0)
    got = client.chat.completions.create(model=server.model_id, messages=CHAT, max_tokens=50, temperature=0)
    assert got.choices[0].message.content == want and got.choices[0].message.role == "assistant"
    assert got.usage.prompt_tokens == len(lm.chat_prompt(CHAT))
    assert got.usage.completion_tokens == lm.stats.generated_tokens


@pytest.mark.parametrize("chat", [False, True])
def test_streamed_text_equals_whole_text_for_the_same_seed(server, client, chat):
    def create(seed, **kw):
        args = dict(model=server.model_id, max_tokens=60, temperature=0.9, top_p=0.95, seed=seed, **kw)
        if chat:
            return client.chat.completions.create(messages=CHAT, **args)
        return client.completions.create(prompt="Once upon", **args)

    whole = create(11)
    text, finish, usage = streamed(create(11, stream=True, stream_options={"include_usage": True}), chat)
    want = whole.choices[0].message.content if chat else whole.choices[0].text
    assert text == want and finish == whole.choices[0].finish_reason
    assert usage.prompt_tokens == whole.usage.prompt_tokens
    assert usage.completion_tokens == whole.usage.completion_tokens
    other = create(12)
    assert (other.choices[0].message.content if chat else other.choices[0].text) != want


def test_stop_strings_end_the_text(server, client):
    full = client.completions.create(model=server.model_id, prompt="The cat", max_tokens=40, temperature=0)
    text = full.choices[0].text
    at = next(i for i in range(5, len(text) - 2) if text[i:i + 2].isascii() and text.find(text[i:i + 2]) == i)
    stop = text[at:at + 2]
    for stops in (stop, ["\u2603never", stop]):
        got = client.completions.create(model=server.model_id, prompt="The cat", max_tokens=40, temperature=0,
                                        stop=stops)
        assert got.choices[0].text == text[:at] and got.choices[0].finish_reason == "stop"
        chunks = client.completions.create(model=server.model_id, prompt="The cat", max_tokens=40, temperature=0,
                                           stop=stops, stream=True)
        assert streamed(chunks, False)[:2] == (text[:at], "stop")


def test_text_output_matches_the_runtime_stream_rules(lm):
    """The engine's push-based text (held back near a stop string) equals the runtime's pulled text_pieces."""
    rng = np.random.default_rng(0)
    for _ in range(20):
        ids = [int(t) for t in rng.integers(0, 256, 30)]
        text = lm.detokenize(ids)
        stops = (text[7:9], "\u2603") if len(text) > 9 else ("\u2603",)
        want = "".join(text_pieces((t for t in ids), lm.tokenizer, stops, GenerationStats()))
        out, got, stopped = TextOutput(lm.tokenizer, stops), [], False
        for t in ids:
            piece, stopped = out.push(t)
            got.append(piece)
            if stopped:
                break
        if not stopped:
            got.append(out.finish())
        assert "".join(got) == want


def error_of(response: httpx.Response, status: int, code: str | None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert isinstance(error["message"], str) and error["message"]
    assert error["type"] and error["code"] == code
    return error


def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(server):
    auth = {"Authorization": f"Bearer {server.api_key}"}
    url = f"{server.url}/v1/completions"
    chat_url = f"{server.url}/v1/chat/completions"
    ok = dict(model=server.model_id, prompt="Hello", max_tokens=3)

    def post(body, target=url, headers=auth):
        return httpx.post(target, content=body if isinstance(body, (bytes, str)) else json.dumps(body),
                          headers={**headers, "Content-Type": "application/json"}, timeout=30)

    error_of(post(b"{not json"), 400, "invalid_json")
    error_of(post(b"[1, 2]"), 400, "invalid_json")
    assert error_of(post({**ok, "max_tokens": "ten"}), 400, "invalid_type")["param"] == "max_tokens"
    assert error_of(post({**ok, "temperature": "hot"}), 400, "invalid_type")["param"] == "temperature"
    error_of(post({**ok, "stream": "yes"}), 400, "invalid_type")
    error_of(post({**ok, "prompt": {"text": "hi"}}), 400, "invalid_type")
    error_of(post({**ok, "stop": [1, 2]}), 400, "invalid_type")
    error_of(post({"model": server.model_id, "messages": "hi"}, chat_url), 400, "invalid_type")
    error_of(post({"model": server.model_id, "messages": [{"role": "wizard", "content": "hi"}]}, chat_url), 400,
             "invalid_value")
    assert error_of(post({**ok, "frobnicate": 1}), 400, "unknown_parameter")["param"] == "frobnicate"
    error_of(post({**ok, "logprobs": 5}), 400, "unsupported_value")
    error_of(post({**ok, "n": 2}), 400, "unsupported_value")
    error_of(post({**ok, "temperature": 3.5}), 400, "invalid_value")
    for bad in (0, -3):
        assert error_of(post({**ok, "max_tokens": bad}), 400, "invalid_value")["param"] == "max_tokens"
    assert error_of(post({**ok, "prompt": "ab" * server.context}), 400, "context_length_exceeded")["param"] == "prompt"
    assert error_of(post({**ok, "prompt": [5] * server.context}), 400, "context_length_exceeded")["param"] == "prompt"
    assert error_of(post({"model": server.model_id, "messages": [{"role": "user", "content": "ab" * server.context}]},
                         chat_url), 400, "context_length_exceeded")["param"] == "messages"
    error_of(post({**ok, "prompt": [1, 2, 100000]}), 400, "invalid_value")
    error_of(post({**ok, "model": "gpt-4o"}), 404, "model_not_found")
    error_of(post({k: v for k, v in ok.items() if k != "model"}), 400, "missing_required_parameter")
    error_of(post({**ok, "prompt": "x" * (MAX_BODY_BYTES + 1000)}), 413, "request_too_large")
    error_of(post(ok, headers={}), 401, "invalid_api_key")
    error_of(post(ok, headers={"Authorization": "Bearer wrong"}), 401, "invalid_api_key")
    error_of(httpx.get(f"{server.url}/v1/models", timeout=10), 401, "invalid_api_key")
    error_of(httpx.get(url, headers=auth, timeout=10), 405, "method_not_allowed")
    error_of(httpx.get(f"{server.url}/v1/engines", headers=auth, timeout=10), 404, "not_found")
    assert server.process.poll() is None
    assert post(ok).json()["choices"][0]["finish_reason"] in ("stop", "length")


def test_openai_client_raises_its_own_errors(server):
    bad_key = openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad_key.models.list()
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=server.api_key, max_retries=0)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4o", prompt="hi")
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=server.model_id, messages=CHAT, max_tokens=0)


async def stream_text(client, prompt: str, **kw) -> str:
    stream = await client.completions.create(model=kw.pop("model"), prompt=prompt, stream=True, **kw)
    return "".join([c.choices[0].text async for c in stream if c.choices])


def test_client_leaving_mid_stream_is_dropped_while_others_continue(server, client):
    others = PROMPTS[4:7]
    alone = {p: client.completions.create(model=server.model_id, prompt=p, max_tokens=150, temperature=0)
             .choices[0].text for p in others}
    dropped = server.health()["dropped"]

    async def leave_early(aclient) -> int:
        stream = await aclient.completions.create(model=server.model_id, prompt="Hello there", max_tokens=900,
                                                  temperature=0.9, seed=1, stream=True)
        seen = 0
        async for _ in stream:
            seen += 1
            if seen == 3:
                break
        await stream.close()
        return seen

    async def run():
        async with openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=server.api_key, max_retries=0) as aclient:
            return await asyncio.gather(leave_early(aclient), *(
                stream_text(aclient, p, model=server.model_id, max_tokens=150, temperature=0) for p in others))

    seen, *texts = asyncio.run(run())
    assert seen == 3
    assert dict(zip(others, texts)) == alone
    deadline = time.monotonic() + 20
    while (h := server.health())["dropped"] != dropped + 1 or h["active"]:
        assert time.monotonic() < deadline, h
        time.sleep(0.05)


def test_sixteen_concurrent_streams_each_get_their_own_text(server, client):
    """16 streams against 8 parallel slots (the rest queue), one with a long prompt prefilled in slices between the
    others' steps: each text equals its single-request run; greedy and seeded sampling alike."""
    prompts = PROMPTS[:7] + [LONG] + PROMPTS[8:]
    settings = [dict(temperature=0) if i % 2 else dict(temperature=0.8, seed=i) for i in range(16)]
    alone = [client.completions.create(model=server.model_id, prompt=p, max_tokens=48, **s).choices[0].text
             for p, s in zip(prompts, settings)]

    async def run():
        async with openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=server.api_key, max_retries=0) as aclient:
            return await asyncio.gather(*(stream_text(aclient, p, model=server.model_id, max_tokens=48, **s)
                                          for p, s in zip(prompts, settings)))

    assert asyncio.run(run()) == alone
    assert server.health()["active"] == 0


def test_listens_on_loopback_only_by_default(server):
    port = int(server.url.rsplit(":", 1)[1])
    with open("/proc/net/tcp") as f:
        listening = [line.split()[1] for line in f.read().splitlines()[1:] if line.split()[3] == "0A"]
    assert f"0100007F:{port:04X}" in listening
    assert "127.0.0.1" in server.log.read_text()


def test_runtime_needs_neither_the_server_nor_its_libraries(server):
    code = ("import sys\n"
            "for m in ('starlette', 'uvicorn', 'sse_starlette', 'nqserve'): sys.modules[m] = None\n"
            "import runtime\n"
            f"assert runtime.load({str(server.path)!r}, threads=1).generate('ab', max_tokens=3, temperature=0)\n"
            "assert 'torch' not in sys.modules\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_unusable_file_option_or_port_is_one_line_and_exit_1(server, tmp_path):
    bad = tmp_path / "bad.nq"
    bad.write_bytes(b"not a model")
    busy = server.url.rsplit(":", 1)[1]
    for args in ([str(bad)], [str(tmp_path / "missing.nq")], [str(bad), "--parallel", "0"],
                 [str(server.path), "--port", busy, "--threads", "1"]):
        run = subprocess.run([sys.executable, "-m", "nqserve", *args], capture_output=True, text=True, timeout=60)
        assert run.returncode == 1 and run.stderr.startswith("nqserve: error:"), run.stderr
        assert len(run.stderr.strip().splitlines()) == 1
