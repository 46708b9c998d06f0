"""`baton generate` as a user runs it: a real process, the embedded model, a clear error on bad input."""
import json
import subprocess
import sys

from tests.helpers.tiny_models import make_tiny_model


def baton(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "baton.deploy.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_generate_with_the_embedded_default_model(default_model_path):
    result = baton("generate", "What is the capital of France?", "--max-tokens", "12", "--json",
                   "--num-threads", "2")
    assert result.returncode == 0, result.stderr
    line = json.loads(result.stdout.strip().splitlines()[-1])
    assert "Paris" in line["text"] and line["finish_reason"] in ("stop", "length")


def test_generate_raw_with_a_local_model_folder(tmp_path):
    folder = make_tiny_model("llama", tmp_path / "m")  # its folder maps to the generic fast tokenizer
    result = baton("generate", "w5 w6 w7", "--raw", "--model", str(folder), "--max-tokens", "5", "--json",
                   "--page-size", "4")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.strip())
    assert len(out["token_ids"]) <= 5 and out["finish_reason"] in ("stop", "length")


def test_bad_flags_and_bad_folder_fail_clearly(tmp_path):
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(3) as pool:  # three CLI start-ups side by side
        missing, bad, schema = pool.map(lambda args: baton(*args), [
            ("generate", "hi", "--model", str(tmp_path / "nope")),
            ("generate", "hi", "--page-size", "0", "--model", str(tmp_path)),
            ("generate", "hi", "--json-schema", "{not json", "--max-tokens", "2")])
    assert missing.returncode == 2 and "no such folder" in missing.stderr
    assert bad.returncode == 2 and "page_size" in bad.stderr
    assert schema.returncode == 2 and "JSON" in schema.stderr
