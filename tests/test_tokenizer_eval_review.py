"""Regression tests for defects found in review: tokenizer files (re-read, corrupt), MT-Bench answer
files (nothing lost on append), the quickstart's --stages, the one-line error of the entry points
and the patch table's targets."""
import base64
import json
import os

import pytest

from data_fixtures import llama_model
from megatron_patch.tokenizer import build_tokenizer


def _write_tiktoken(path, tokens):
    with open(path, "wb") as f:
        for i, t in enumerate(tokens):
            f.write(base64.b64encode(t) + b" %d\n" % i)


def test_tiktoken_file_replaced_at_same_path_is_read_again(tmp_path):
    # tiktoken.load caches a file by its path: the second build used to see the first file
    path = str(tmp_path / "qwen.tiktoken")
    base = [bytes([i]) for i in range(256)]
    _write_tiktoken(path, base)
    first = build_tokenizer("tiktoken", path)
    assert first.original_vocab_size == 256 + 208 and first.tokenize("ab") == [97, 98]
    _write_tiktoken(path, base + [b"ab"])
    second = build_tokenizer("tiktoken", path)
    assert second.original_vocab_size == 257 + 208
    assert second.tokenize("ab") == [256]
    assert second.eod == 257  # the specials start after the new ranks


@pytest.mark.parametrize("kind,name,data,where", [
    ("sentencepiece", "tokenizer.model", b"not a protobuf", "tokenizer.model"),
    ("auto", "tokenizer.json", b"{not json", "tokenizer.json"),
    ("auto", "qwen.tiktoken", b"not base64 at all\n", "qwen.tiktoken:1"),
    ("auto", "qwen.tiktoken", b"", "no tokens"),
])
def test_corrupt_tokenizer_file_is_a_value_error_naming_it(tmp_path, kind, name, data, where):
    # used to be RuntimeError (sentencepiece), a bare Exception without the path (tokenizers), a
    # bare "max() arg is an empty sequence" (empty tiktoken): tracebacks in the CLIs
    (tmp_path / name).write_bytes(data)
    with pytest.raises(ValueError, match=where):
        build_tokenizer(kind, str(tmp_path))
    from megatron_patch.generation.loader import GenerationSetupError, load_tokenizer

    with pytest.raises(GenerationSetupError, match="tokenizer"):
        load_tokenizer(str(tmp_path), str(tmp_path))


def test_good_sentencepiece_still_loads():
    assert build_tokenizer("sentencepiece", llama_model()).tokenize("Hello world") == [22557, 1526]


def test_answer_append_keeps_a_complete_last_record_without_newline(tmp_path):
    from megatron_patch.evaluation.answers import _append, load_answers

    path = str(tmp_path / "sft.jsonl")
    with open(path, "w", encoding="utf-8") as f:  # another tool's file: no final newline
        f.write(json.dumps({"question_id": 1, "turns": ["a"]}) + "\n"
                + json.dumps({"question_id": 2, "turns": ["b"]}))
    assert sorted(load_answers(path)) == ["1", "2"]
    _append(path, {"question_id": 3, "turns": ["c"]})
    assert sorted(load_answers(path)) == ["1", "2", "3"]  # answer 2 used to be cut off
    # a torn last line (an interrupted write) is still cut off
    with open(path, "a", encoding="utf-8") as f:
        f.write('{"question_id": 4, "tu')
    _append(path, {"question_id": 5, "turns": ["e"]})
    assert sorted(load_answers(path)) == ["1", "2", "3", "5"]
    assert open(path, encoding="utf-8").read().count("\n") == 4


def test_quickstart_stages(tmp_path, monkeypatch, capsys):
    from megatron_patch import quickstart

    seen = {}

    def fake(name):
        def run(ctx):
            seen[name] = dict(ctx.results)
            ctx.stage_dir(name)  # as every real stage does
            return {"line": f"{name} done", "checkpoint": f"/ckpt/{name}", "losses": [2.0, 1.0],
                    "train_loss": [2.0, 1.0], "valid": [], "first_loss": 2.0, "last_loss": 1.0,
                    "valid_loss": 1.5}
        return run

    monkeypatch.setattr(quickstart, "STAGES", [(n, t, fake(n)) for n, t, _ in quickstart.STAGES])
    run_dir = str(tmp_path / "run")
    # a misspelt stage used to run nothing and exit 0
    assert quickstart.main(["--run-dir", run_dir, "--stages", "pretrian"]) == 2
    assert "unknown stage pretrian" in capsys.readouterr().err
    # a later stage alone without the earlier results: a clear error, not a KeyError traceback
    assert quickstart.main(["--run-dir", run_dir, "--stages", "sft"]) == 2
    assert "needs the result of stage data" in capsys.readouterr().err
    assert quickstart.main(["--run-dir", run_dir, "--stages", "data,pretrain"]) == 0
    # redoing one later stage reads the earlier stages' results from their result.json
    assert quickstart.main(["--run-dir", run_dir, "--stages", "sft", "--force"]) == 0
    assert seen["sft"]["pretrain"]["checkpoint"] == "/ckpt/pretrain"
    assert "sft done" in open(os.path.join(run_dir, "results.md"), encoding="utf-8").read()


def test_entry_point_error_line_keeps_the_message_quotes(capsys):
    from megatron_patch.cli import run_entry

    def bad_value():
        raise ValueError("--model 'a=': no checkpoint after '='")

    assert run_entry(bad_value) == 2
    assert capsys.readouterr().err.strip() == "error: --model 'a=': no checkpoint after '='"

    def bad_key():
        raise KeyError("family llama has no size preset '9B'")

    assert run_entry(bad_key) == 2
    assert capsys.readouterr().err.strip() == "error: family llama has no size preset '9B'"


def test_patch_targets_name_what_they_replace():
    from megatron_patch import patches

    by_name = {p.name: p for p in patches.REGISTRY}
    shim = [t.strip() for t in by_name["shim.cuda_factories"].target.split(",")]
    assert len(shim) == len(set(shim)), shim  # core.utils and transformer.utils told apart
    assert "is_available" in by_name["cuda.current_device"].target
    assert "memory_reserved" in by_name["cuda.memory_stats"].target
