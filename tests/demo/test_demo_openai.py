"""The demo server through the official ``openai`` client, with the SDK's defaults: streamed chat and
completions (with the usage chunk), base64 embeddings, text content parts, token-id prompts, model
lookup; and what the demo does not implement is refused with a message, never ignored."""

from __future__ import annotations

import httpx
import pytest

pytest.importorskip("torch")
openai = pytest.importorskip("openai")

from _server_testkit import SPEC_503_BODY, FakeController, loopback_server, wait_until  # noqa: E402

from gpusleep import __version__  # noqa: E402
from gpusleep.demo import TinyEngine, TinyTransformerConfig, create_app  # noqa: E402

SMALL = TinyTransformerConfig(d_model=32, n_heads=2, d_ff=64, max_seq_len=64)
MODEL = "gpusleep-tiny"


@pytest.fixture(scope="module")
def server():
    controller = FakeController()
    app = create_app(TinyEngine(SMALL), controller)
    with loopback_server() as loopback, loopback.mount(app) as url:
        yield url, controller


@pytest.fixture(scope="module")
def client(server):
    url, _ = server
    with openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=30) as sdk:
        yield sdk


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server[0], timeout=30) as plain:
        yield plain


def test_streamed_chat_adds_up_to_the_answer_and_ends_with_usage(client):
    messages = [{"role": "user", "content": "Hello"}]
    whole = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=9, temperature=0)
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=messages,
            max_tokens=9,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content and len(text) == 9
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 9
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens
    assert all(c.usage is None for c in chunks[:-1])
    assert len({c.id for c in chunks}) == 1 and chunks[0].object == "chat.completion.chunk"


def test_streamed_chat_without_usage_sends_no_usage_chunk(client):
    chunks = list(
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=3, temperature=0, stream=True
        )
    )
    assert all(c.choices for c in chunks) and all(c.usage is None for c in chunks)


def test_streamed_completions_of_two_prompts_match_the_whole_answers(client):
    prompts = ["Once upon", "a time"]
    whole = client.completions.create(model=MODEL, prompt=prompts, max_tokens=6, temperature=0.7, seed=3)
    chunks = list(
        client.completions.create(
            model=MODEL,
            prompt=prompts,
            max_tokens=6,
            temperature=0.7,
            seed=3,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    for index, _prompt in enumerate(prompts):
        text = "".join(c.choices[0].text for c in chunks if c.choices and c.choices[0].index == index)
        assert text == whole.choices[index].text
    assert chunks[-1].usage.total_tokens == whole.usage.total_tokens


def test_a_stop_string_never_reaches_the_stream(client):
    """Text that may turn out to be the start of a stop string is held back; the stream stops before it."""
    base = client.completions.create(model=MODEL, prompt="abc", max_tokens=12, temperature=0).choices[0].text
    stop = base[4:6]
    whole = client.completions.create(model=MODEL, prompt="abc", max_tokens=12, temperature=0, stop=[stop])
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(
            model=MODEL, prompt="abc", max_tokens=12, temperature=0, stop=[stop], stream=True
        )
    )
    assert streamed == whole.choices[0].text == base[: base.index(stop)]


def test_embeddings_with_the_sdk_default_base64_equal_the_floats(client):
    default = client.embeddings.create(model=MODEL, input=["one", "two"])  # the SDK asks for base64
    floats = client.embeddings.create(model=MODEL, input=["one", "two"], encoding_format="float")
    for a, b in zip(default.data, floats.data, strict=False):
        assert len(a.embedding) == SMALL.d_model
        assert a.embedding == pytest.approx(b.embedding, abs=1e-6)


def test_token_ids_are_prompts_and_inputs(client, http):
    ids = http.post("/tokenize", json={"prompt": "Once"}).json()["tokens"]
    by_text = client.completions.create(model=MODEL, prompt="Once", max_tokens=5, temperature=0)
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=5, temperature=0)
    two = client.completions.create(model=MODEL, prompt=[ids, ids], max_tokens=5, temperature=0)
    assert by_ids.choices[0].text == by_text.choices[0].text == two.choices[1].text
    emb_text = client.embeddings.create(model=MODEL, input="Once", encoding_format="float").data[0].embedding
    emb_ids = client.embeddings.create(model=MODEL, input=ids, encoding_format="float").data[0].embedding
    assert emb_ids == emb_text
    with pytest.raises(openai.BadRequestError, match="vocabulary"):
        client.completions.create(model=MODEL, prompt=[1, 10**6], max_tokens=2)


def test_content_as_text_parts_is_the_same_chat(client):
    as_text = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi\nthere"}], max_tokens=6, temperature=0
    )
    as_parts = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "there"}]}],
        max_tokens=6,
        temperature=0,
    )
    assert as_parts.choices[0].message.content == as_text.choices[0].message.content
    with pytest.raises(openai.BadRequestError, match="text only") as refused:
        client.chat.completions.create(
            model=MODEL,
            max_tokens=2,
            messages=[
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}
            ],
        )
    assert refused.value.body["param"] == "messages.0.content.0.type"


def test_models_retrieve_and_list(client):
    assert [m.id for m in client.models.list()] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.models.retrieve("gpt-4o")


@pytest.mark.parametrize(
    "kind, extra, param",
    [
        ("chat", {"logprobs": True}, "logprobs"),
        ("chat", {"top_logprobs": 2, "logprobs": False}, "top_logprobs"),
        ("chat", {"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ("chat", {"response_format": {"type": "json_object"}}, "response_format"),
        ("chat", {"presence_penalty": 0.5}, "presence_penalty"),
        ("chat", {"stream_options": {"include_usage": True}}, "stream_options"),
        ("completions", {"logprobs": 2}, "logprobs"),
        ("completions", {"echo": True}, "echo"),
        ("completions", {"best_of": 2}, "best_of"),
        ("completions", {"suffix": "end"}, "suffix"),
        ("completions", {"extra_body": {"top_k": 5}}, "top_k"),
    ],
)
def test_what_the_demo_does_not_do_is_refused_by_name(client, kind, extra, param):
    with pytest.raises(openai.BadRequestError) as refused:
        if kind == "chat":
            client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=2, **extra
            )
        else:
            client.completions.create(model=MODEL, prompt="x", max_tokens=2, **extra)
    assert refused.value.body["param"] == param
    assert param in refused.value.body["message"]


def test_the_values_that_ask_for_nothing_are_accepted(client):
    answer = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "x"}],
        max_tokens=2,
        logprobs=False,
        presence_penalty=0.0,
        frequency_penalty=0,
        user="me",
        response_format={"type": "text"},
    )
    assert answer.choices[0].message.content


def test_embeddings_dimensions_other_than_the_models_are_refused(client):
    assert len(client.embeddings.create(model=MODEL, input="x", dimensions=SMALL.d_model).data[0].embedding) == 32
    with pytest.raises(openai.BadRequestError, match="dimensions"):
        client.embeddings.create(model=MODEL, input="x", dimensions=8)


def test_head_health_and_version(http):
    head = http.head("/health")
    assert head.status_code == 200 and head.content == b""
    assert http.get("/version").json() == {"version": __version__}


def test_a_stream_while_asleep_is_the_specs_503_and_the_sdk_says_so(server, client, http):
    url, controller = server
    assert http.post("/sleep?level=1").status_code == 200
    try:
        with pytest.raises(openai.InternalServerError) as asleep:
            client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], stream=True)
        assert asleep.value.status_code == 503 and asleep.value.body == SPEC_503_BODY["error"]
        assert http.get("/version").status_code == 200 and http.get(f"/v1/models/{MODEL}").status_code == 200
    finally:
        assert http.post("/wake_up").status_code == 200


def test_a_client_that_leaves_a_stream_frees_the_engine_for_the_next_request(http):
    body = {"model": MODEL, "prompt": "x", "max_tokens": 60, "temperature": 0, "stream": True}
    with http.stream("POST", "/v1/completions", json=body) as stream:
        first = next(stream.iter_lines())
        assert first.startswith("data: {")
    answer = http.post("/v1/completions", json={**body, "stream": False, "max_tokens": 3})
    assert answer.status_code == 200 and len(answer.json()["choices"][0]["text"]) == 3
    wait_until(lambda: "gpusleep_in_flight_requests 0.0" in http.get("/metrics").text, "the stream to be released")
