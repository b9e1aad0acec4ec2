"""The official `openai` client works unchanged against `infergrid-worker serve`."""

from __future__ import annotations

import httpx
import openai
import pytest
from server_harness import API_KEY, MODEL_NAME, WorkerServer


@pytest.fixture(scope="module")
def client(server: WorkerServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=60.0)


def test_models_lists_the_served_name(client: openai.OpenAI) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL_NAME]


def test_completion(client: openai.OpenAI) -> None:
    out = client.completions.create(model=MODEL_NAME, prompt="Once upon a time", max_tokens=7, temperature=0,
                                    extra_body={"ignore_eos": True})
    assert out.object == "text_completion" and out.model == MODEL_NAME
    assert len(out.choices) == 1 and out.choices[0].finish_reason == "length"
    assert out.usage is not None and out.usage.completion_tokens == 7
    assert out.usage.total_tokens == out.usage.prompt_tokens + 7
    assert out.choices[0].text


def test_completion_token_id_prompts_and_several_prompts(client: openai.OpenAI) -> None:
    out = client.completions.create(model=MODEL_NAME, prompt=[[5, 6, 7], [8, 9]], max_tokens=3, temperature=0,
                                    n=2, extra_body={"ignore_eos": True})
    assert sorted(c.index for c in out.choices) == [0, 1, 2, 3]
    assert out.usage.prompt_tokens == 3 + 2  # each prompt counted once; its n samples share it
    assert out.usage.completion_tokens == 4 * 3


def test_chat_completion(client: openai.OpenAI) -> None:
    out = client.chat.completions.create(model=MODEL_NAME, messages=[
        {"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say hello"}],
        max_tokens=5, temperature=0)
    assert out.object == "chat.completion"
    msg = out.choices[0].message
    assert msg.role == "assistant" and isinstance(msg.content, str)
    assert out.choices[0].finish_reason in ("stop", "length")
    assert out.usage.completion_tokens >= 1


def test_chat_content_parts(client: openai.OpenAI) -> None:
    out = client.chat.completions.create(model=MODEL_NAME, messages=[
        {"role": "user", "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": "there"}]}],
        max_tokens=2, temperature=0)
    assert out.choices[0].message.content is not None


def test_streaming_chat_with_usage(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "Count"}],
                                            max_tokens=12, temperature=0, stream=True,
                                            stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == ["length"]
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None and last.usage.completion_tokens == 12
    assert all(c.usage is None for c in chunks[:-1])
    # The stream says the same as the non-streaming answer (greedy).
    full = client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "Count"}],
                                          max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
    assert text == full.choices[0].message.content


def test_streaming_completion_ends_with_done(server: WorkerServer) -> None:
    with server.client() as http, http.stream("POST", "/v1/completions", json={
            "model": MODEL_NAME, "prompt": "Hi", "max_tokens": 4, "stream": True, "ignore_eos": True}) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        events = [line for line in resp.iter_lines() if line]
    assert events[-1] == "data: [DONE]"
    assert all(e.startswith("data: ") for e in events)


def test_streaming_several_prompts_with_n(client: openai.OpenAI) -> None:
    stream = client.completions.create(model=MODEL_NAME, prompt=["First prompt", "Second one"], n=2,
                                       max_tokens=5, temperature=0.8, seed=3, stream=True,
                                       stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    texts: dict[int, str] = {}
    finished: dict[int, str] = {}
    usage = None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + choice.text
            if choice.finish_reason:
                assert choice.index not in finished  # one finish per choice
                finished[choice.index] = choice.finish_reason
    assert finished == {0: "length", 1: "length", 2: "length", 3: "length"}
    assert usage is not None and usage.completion_tokens == 4 * 5


def test_n_greater_than_one(client: openai.OpenAI) -> None:
    out = client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "Hi"}],
                                         max_tokens=8, temperature=1.0, n=3, seed=7,
                                         extra_body={"ignore_eos": True})
    assert sorted(c.index for c in out.choices) == [0, 1, 2]
    assert out.usage.completion_tokens == 24
    texts = {c.message.content for c in out.choices}
    assert len(texts) > 1  # independent samples


def test_stop_string(client: openai.OpenAI) -> None:
    base = client.completions.create(model=MODEL_NAME, prompt="The weather", max_tokens=16, temperature=0,
                                     extra_body={"ignore_eos": True})
    text = base.choices[0].text
    assert len(text) >= 4
    stop = text[2:4]
    stopped = client.completions.create(model=MODEL_NAME, prompt="The weather", max_tokens=16, temperature=0,
                                        stop=[stop], extra_body={"ignore_eos": True})
    choice = stopped.choices[0]
    assert choice.finish_reason == "stop"
    assert choice.text == text[: text.index(stop)]
    assert stop not in choice.text


def test_stop_token_ids(client: openai.OpenAI, server: WorkerServer) -> None:
    with server.client() as http:
        greedy = http.post("/v1/generate", json={"prompt_token_ids": [10, 11, 12], "max_tokens": 8,
                                                 "temperature": 0, "ignore_eos": True}).json()
    ids = greedy["token_ids"]
    stop_id = ids[3]
    out = client.completions.create(model=MODEL_NAME, prompt=[10, 11, 12], max_tokens=8, temperature=0,
                                    extra_body={"ignore_eos": True, "stop_token_ids": [stop_id]})
    choice = out.choices[0]
    assert choice.finish_reason == "stop"
    assert choice.model_extra["stop_reason"] == stop_id
    assert out.usage.completion_tokens == ids.index(stop_id) + 1


def test_completion_logprobs(client: openai.OpenAI) -> None:
    out = client.completions.create(model=MODEL_NAME, prompt="Hello", max_tokens=5, temperature=0, logprobs=3,
                                    extra_body={"ignore_eos": True})
    lp = out.choices[0].logprobs
    assert lp is not None and len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    assert "".join(lp.tokens) == out.choices[0].text
    for sampled, top in zip(lp.token_logprobs, lp.top_logprobs, strict=True):
        assert sampled is not None and sampled <= 0.0
        assert 1 <= len(top) <= 4
        assert abs(max(top.values()) - sampled) < 1e-4  # greedy: the sampled token is the most likely
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0


def test_chat_logprobs(client: openai.OpenAI) -> None:
    out = client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "Hi"}],
                                         max_tokens=4, temperature=0, logprobs=True, top_logprobs=2,
                                         extra_body={"ignore_eos": True})
    content = out.choices[0].logprobs.content
    assert len(content) == 4
    for tok in content:
        assert tok.logprob <= 0.0 and len(tok.top_logprobs) == 2
        assert tok.top_logprobs[0].logprob >= tok.top_logprobs[1].logprob
        assert abs(tok.top_logprobs[0].logprob - tok.logprob) < 1e-4


def test_seed_reproducibility(client: openai.OpenAI) -> None:
    def sample(seed: int) -> str:
        out = client.completions.create(model=MODEL_NAME, prompt="Tell me a story", max_tokens=16,
                                        temperature=1.0, seed=seed, extra_body={"ignore_eos": True})
        return out.choices[0].text

    a, b, c = sample(1234), sample(1234), sample(4321)
    assert a == b
    assert a != c


def test_echo(client: openai.OpenAI) -> None:
    out = client.completions.create(model=MODEL_NAME, prompt="Hello world", max_tokens=3, temperature=0, echo=True)
    assert out.choices[0].text.startswith("Hello world")


def test_cached_tokens_reported_for_a_repeated_prompt(client: openai.OpenAI) -> None:
    prompt = "A long shared prefix about the sea, the sky and the stars. " * 3
    first = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=2, temperature=0)
    second = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=2, temperature=0)
    assert first.usage.prompt_tokens == second.usage.prompt_tokens >= 32
    assert second.usage.prompt_tokens_details.cached_tokens >= 16  # at least one full block reused


def test_api_key_required(server: WorkerServer) -> None:
    bad = openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as err:
        bad.models.list()
    assert err.value.status_code == 401
    body = err.value.body
    assert isinstance(body, dict) and body["code"] == "invalid_api_key"
    missing = httpx.post(f"{server.url}/v1/completions", json={"prompt": "x"}, timeout=10)
    assert missing.status_code == 401
    assert set(missing.json()["error"]) == {"message", "type", "param", "code"}
    for probe in ("/health", "/ready", "/metrics"):  # probes and the scrape need no key
        assert httpx.get(f"{server.url}{probe}", timeout=10).status_code == 200


def test_unknown_model_is_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as err:
        client.completions.create(model="no-such-model", prompt="Hi", max_tokens=1)
    assert err.value.body["param"] == "model"


def test_context_length_error_is_400(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=MODEL_NAME, prompt="Hello", max_tokens=100_000)
    assert err.value.body["param"] == "max_tokens"
    assert err.value.body["code"] == "context_length_exceeded"
