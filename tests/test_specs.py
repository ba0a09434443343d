"""Spec validation: bad input is refused at submit with a message naming the field."""

from __future__ import annotations

import pytest

from api_client import GenerateSpec, ScoreSpec, SpecError, parse_spec
from api_client.specs import make_spec


def refused(kind: str, **fields: object) -> str:
    with pytest.raises(SpecError) as info:
        make_spec(kind, **fields)
    return str(info.value)


def test_valid_specs_round_trip_as_json() -> None:
    score = make_spec("score", text="Finn writes code", model="gpt2", top_logprobs=5)
    assert isinstance(score, ScoreSpec)
    assert parse_spec(score.model_dump(mode="json")) == score
    gen = make_spec("generate", prompt="Finn", model="gpt2", do_sample=True, temperature=0.7,
                    top_k=50, top_p=0.9, seed=3, num_return_sequences=2, top_logprobs=20)
    assert isinstance(gen, GenerateSpec)
    assert parse_spec(gen.model_dump(mode="json")) == gen
    assert gen.model_dump(mode="json")["kind"] == "generate"


@pytest.mark.parametrize(
    ("kind", "fields", "expected"),
    [
        ("score", {"model": "gpt2"}, "give exactly one of text and token_ids"),
        ("score", {"model": "gpt2", "text": "a", "token_ids": [1, 2]}, "exactly one"),
        ("score", {"model": "gpt2", "text": "a", "top_logprobs": 21}, "top_logprobs"),
        ("score", {"model": "gpt2", "text": "a", "top_logprobs": -1}, "top_logprobs"),
        ("score", {"model": "gpt2", "token_ids": [5]}, "prepend_bos=True"),
        ("score", {"model": "gpt2", "token_ids": [1, -3]}, "token_ids.1"),
        ("score", {"model": "", "text": "a"}, "model"),
        ("score", {"model": "gpt2", "text": "a", "device": "gpu"}, "device"),
        ("score", {"model": "gpt2", "text": "a", "dtype": "int8"}, "dtype"),
        ("score", {"model": "gpt2", "text": "a", "colour": "red"}, "colour"),
        ("score", {"model": "./no/such/dir", "text": "a"}, "does not exist"),
        ("generate", {"model": "gpt2", "prompt": "a", "max_new_tokens": 0}, "max_new_tokens"),
        ("generate", {"model": "gpt2", "prompt": "a", "temperature": 0.5},
         "temperature only applies when sampling"),
        ("generate", {"model": "gpt2", "prompt": "a", "temperature": 0.5, "top_k": 3},
         "temperature, top_k only apply when sampling"),
        ("generate", {"model": "gpt2", "prompt": "a", "do_sample": "false", "seed": 1},
         "seed only applies when sampling"),
        ("score", {"model": " gpt2", "text": "a"}, "neither an existing directory nor a hub"),
        ("score", {"model": "gpt2\n", "text": "a"}, "check for spaces"),
        ("score", {"model": "davinci-002", "text": "a", "backend": "openai", "reuse": True},
         "reuse applies to backend='hf' only"),
        ("generate", {"model": "gpt2", "prompt": "a", "seed": 1}, "do_sample=True"),
        ("generate", {"model": "gpt2", "prompt": "a", "num_return_sequences": 3},
         "num_return_sequences > 1 needs do_sample=True"),
        ("generate", {"model": "gpt2", "prompt": "a", "do_sample": True, "temperature": 0},
         "temperature"),
        ("generate", {"model": "gpt2", "prompt": "a", "do_sample": True, "top_p": 1.5}, "top_p"),
        ("generate", {"model": "gpt2", "prompt": ""}, "prompt"),
        ("generate", {"model": "gpt2", "prompt": "a", "backend": "vllm"}, "backend"),
        ("generate", {"model": "gpt2", "prompt": "a", "do_sample": True,
                      "temperature": float("nan")}, "temperature: Input should be a finite"),
        ("generate", {"model": "davinci-002", "prompt": "a", "backend": "openai",
                      "do_sample": True, "temperature": 2.5}, "temperature is at most 2"),
        ("score", {"model": "m" * 513, "text": "a"}, "model: String should have at most 512"),
    ],
)
def test_invalid_specs_name_the_field(kind: str, fields: dict, expected: str) -> None:
    message = refused(kind, **fields)
    assert message.startswith("invalid probe spec: ")
    assert expected in message


def test_unknown_kind_is_refused() -> None:
    with pytest.raises(SpecError, match="kind"):
        parse_spec({"kind": "embed", "model": "gpt2"})


def test_client_side_imports_no_heavy_packages() -> None:
    import subprocess
    import sys

    code = ("import sys, api_client, api_client.cli, api_client.client; "
            "bad = [m for m in ('torch', 'transformers', 'openai', 'worker') if m in sys.modules]; "
            "print(','.join(bad))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_token_ids_come_from_arrays_and_tensors() -> None:
    import numpy as np
    import torch

    from api_client.specs import token_id_list

    for ids in ([464, 2068], np.array([464, 2068]), torch.tensor([[464, 2068]]),
                (np.int64(464), 2068)):
        spec = make_spec("score", model="gpt2", token_ids=token_id_list(ids))
        assert spec.token_ids == [464, 2068] and type(spec.token_ids[0]) is int
    assert "token_ids" in refused("score", model="gpt2", text="a", token_ids=token_id_list([]))


def test_model_directories_are_stored_absolute(tmp_path, monkeypatch) -> None:
    (tmp_path / "models" / "tiny").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "models")
    assert make_spec("score", model="./tiny", text="a").model == str(tmp_path / "models" / "tiny")
    assert make_spec("score", model="../models/tiny", text="a").model == \
        str(tmp_path / "models" / "tiny")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert make_spec("score", model="~/models/tiny", text="a").model == \
        str(tmp_path / "models" / "tiny")
    assert make_spec("score", model="gpt2", text="a").model == "gpt2"
    # A directory named without ./ is still the directory (from_pretrained reads it
    # so), not a hub name for the worker to resolve against its own directory.
    assert make_spec("score", model="tiny", text="a").model == str(tmp_path / "models" / "tiny")
    assert "drop revision" in refused("score", model="./tiny", text="a", revision="main")


def test_naming_a_default_is_the_same_probe() -> None:
    from api_client.determinism import config_hash
    from api_client.reuse import spec_hash

    pairs = [
        (dict(kind="score", text="a b", model="gpt2"),
         dict(kind="score", text="a b", model="gpt2", dtype="float32")),
        (dict(kind="generate", prompt="a", model="gpt2", do_sample=True, seed=1),
         dict(kind="generate", prompt="a", model="gpt2", do_sample=True, seed=1,
              temperature=1.0, top_p=1.0)),
        (dict(kind="generate", prompt="a", model="davinci-002", backend="openai"),
         dict(kind="generate", prompt="a", model="davinci-002", backend="openai",
              openai_api="completions")),
    ]
    for implicit, explicit in pairs:
        a, b = make_spec(**implicit), make_spec(**explicit)
        assert a == b and config_hash(a) == config_hash(b) and spec_hash(a) == spec_hash(b)
    assert make_spec("score", text="a b", model="gpt2").dtype == "float32"
    assert make_spec("generate", prompt="a", model="gpt2").temperature is None  # greedy
    assert make_spec("score", text="a b", model="gpt2", dtype="bfloat16").dtype == "bfloat16"
    openai = make_spec("generate", prompt="a", model="m", backend="openai", do_sample=True)
    assert (openai.dtype, openai.temperature, openai.top_p) == (None, 1.0, None)


def test_model_copy_validates_the_copy() -> None:
    """A spec varied with ``model_copy(update=...)`` is checked like a new one: what no
    spec may hold is refused (not found by the worker later), and the defaults its
    options imply are filled in (one configuration, one hash)."""
    from api_client.determinism import config_hash

    greedy = make_spec("generate", prompt="Finn", model="gpt2")
    for update, expected in (({"top_logprobs": 500}, "top_logprobs"),
                             ({"seed": 3}, "seed only applies when sampling"),
                             ({"backend": "openai"}, "drop them for backend='openai'"),
                             ({"model": "./no/such/dir"}, "does not exist"),
                             ({"kind": "score"}, "kind")):
        with pytest.raises(SpecError, match=expected):
            greedy.model_copy(update=update)
    sampled = greedy.model_copy(update={"do_sample": True, "seed": 1})
    made = make_spec("generate", prompt="Finn", model="gpt2", do_sample=True, seed=1)
    assert sampled == made and config_hash(sampled) == config_hash(made)
    assert sampled.temperature == 1.0 and sampled.top_p == 1.0
    assert greedy.model_copy() == greedy


def test_a_single_string_is_not_a_list_of_texts_or_models() -> None:
    from api_client.sweeps import sweep_specs

    for call, name in ((lambda: sweep_specs("The quick brown fox", models=["gpt2"]), "texts"),
                       (lambda: sweep_specs(["a b"], models="gpt2"), "models"),
                       (lambda: sweep_specs(["a b"], models=["gpt2"], seeds=5), "seeds")):
        with pytest.raises(SpecError, match=f"{name}: pass a list"):
            call()
