"""The README's first command: the running example on the embedded default
(an embedded Redis server and a SQLite file, no URLs set), end to end."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from api_client.embedded_redis import stop_embedded_redis
from tests.helpers import REPO_ROOT, subprocess_env


def test_running_example_on_embedded_default(tmp_path: Path) -> None:
    home = tmp_path / "home"
    env = subprocess_env(LOGPROBE_HOME=str(home))
    for name in ("LOGPROBE_REDIS_URL", "LOGPROBE_DATABASE_URL"):
        env.pop(name, None)
    try:
        out = subprocess.run([sys.executable, "examples/running_example.py", "--tiny"],
                             cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                             timeout=300)
        assert out.returncode == 0, out.stdout + out.stderr
        assert (home / "logprobe.db").exists()
        assert (home / "redis" / "port").exists()
    finally:
        stop_embedded_redis(home / "redis")

    model_dir = home / "models" / "tiny-gpt2"
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = torch.tensor([tok("Finn writes code", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        loss = model(ids, labels=ids).loss.item()
    printed = float(re.search(r"loss = ([0-9.]+)", out.stdout).group(1))
    assert abs(printed - loss) < 1e-5
    inputs = tok("Finn writes code", return_tensors="pt")
    with torch.no_grad():
        gen = model.generate(**inputs, do_sample=False, max_new_tokens=5,
                             pad_token_id=tok.eos_token_id)
    continuation = tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True)
    assert f"+ {continuation!r}" in out.stdout
    assert "== the same, queried with SQL:" in out.stdout
    assert not os.environ.get("LOGPROBE_HOME")  # the test did not leak its home
