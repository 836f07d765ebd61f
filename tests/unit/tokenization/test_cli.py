"""`kvcache tokenize`: completion text or chat body on stdin, ids out, one-line errors."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import io
import json

import models

from kvcache.service import cli
from kvcache.tokenization import TextTokenizer


@pytest.fixture
def chatml_dir() -> Path:
    return models.chatml_dir()


@pytest.fixture
def text() -> TextTokenizer:
    return models.text_tokenizer()


def _run(monkeypatch: pytest.MonkeyPatch, argv: list[str], stdin: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    monkeypatch.setattr("sys.stdout", out)
    monkeypatch.setattr("sys.stderr", err)
    code = cli.main(argv)
    return code, out.getvalue(), err.getvalue()


def test_completion_and_chat(
    monkeypatch: pytest.MonkeyPatch, chatml_dir: Path, text: TextTokenizer
) -> None:
    code, out, _ = _run(monkeypatch, ["tokenize", "--tokenizer", str(chatml_dir)], "Hello world")
    assert code == 0 and json.loads(out) == text.tokenize_completion("Hello world", "m")
    body = {"messages": [{"role": "user", "content": "hi"}]}
    code, out, _ = _run(
        monkeypatch, ["tokenize", "--chat", "--tokenizer", str(chatml_dir)], json.dumps(body)
    )
    from kvcache.tokenization import prepare_request

    assert (
        code == 0 and json.loads(out) == prepare_request({"model": "m", **body}, text)[0].token_ids
    )


def test_models_dir_and_chat_template_file(
    monkeypatch: pytest.MonkeyPatch, chatml_dir: Path, tmp_path: Path
) -> None:
    import shutil

    import models

    shutil.copytree(chatml_dir, tmp_path / "org" / "chat")
    template = tmp_path / "t.jinja"
    template.write_text(models.STRING_TEMPLATE)
    body = json.dumps(
        {
            "messages": [
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
                }
            ]
        }
    )
    argv = ["tokenize", "--chat", "--model", "org/chat", "--models-dir", str(tmp_path)]
    code, out, _ = _run(monkeypatch, [*argv, "--chat-template", str(template)], body)
    assert code == 0
    ids = json.loads(out)
    code, default_out, _ = _run(monkeypatch, argv, body)
    assert code == 0 and json.loads(default_out) != ids


@pytest.mark.parametrize(
    ("argv", "stdin", "needle"),
    [
        (["tokenize", "--chat", "--tokenizer", "{dir}"], "{", "not valid JSON"),
        (["tokenize", "--chat", "--tokenizer", "{dir}"], "[]", "JSON object"),
        (
            ["tokenize", "--model", "nope", "--models-dir", "/nonexistent"],
            "x",
            "no tokenizer for model",
        ),
        (["tokenize"], "x", "--model"),
        (["tokenize", "--tokenizer", "{dir}", "--chat-template", "/no/file"], "x", "no such file"),
    ],
)
def test_errors_are_one_line(
    monkeypatch: pytest.MonkeyPatch, chatml_dir: Path, argv: list[str], stdin: str, needle: str
) -> None:
    argv = [arg.replace("{dir}", str(chatml_dir)) for arg in argv]
    code, out, err = _run(monkeypatch, argv, stdin)
    assert code == 1 and out == ""
    assert needle in err and err.count("\n") == 1 and err.startswith("kvcache tokenize: error:")
