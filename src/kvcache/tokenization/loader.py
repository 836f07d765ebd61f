"""Finding and loading tokenizers: explicit paths, a local models directory, the HF cache, the hub.

Loading goes through transformers' ``AutoTokenizer`` when it is installed, as vLLM does
(``truncation_side="left"``, the generate runner's default), because transformers may rewrite
the Rust tokenizer's post-processor from ``tokenizer_config.json`` (``add_bos_token``...). The
tokens are then computed with a private copy of that Rust tokenizer: the same ``encode`` call
vLLM's ``tokenizer(prompt, add_special_tokens=...)`` ends in, without the Python overhead.
Without transformers a bare ``tokenizer.json`` is used (exact for completions only when
transformers would not rewrite the post-processor).
"""

from __future__ import annotations

import copy
import itertools
import json
import os
import re
import socket
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

from kvcache.tokenization.errors import (
    ChatTemplateError,
    MissingDependencyError,
    TokenizationError,
    TokenizerNotFoundError,
)

TOKENIZER_FILE = "tokenizer.json"
_HF_CACHE_PREFIX = "models--"
_uids = itertools.count(1)


@dataclass(frozen=True, slots=True)
class TokenizerSource:
    """Where a model's tokenizer lives: a local directory, or a hub repository id."""

    model: str
    origin: Literal["explicit", "models_dir", "hf_cache", "hub"]
    location: str


def _hf_cache_root(configured: str | None) -> Path:
    if configured:
        return Path(configured).expanduser()
    if env := os.environ.get("HF_HUB_CACHE"):
        return Path(env).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache/huggingface")
    return Path(home) / "hub"


def _model_name_from_path(relative: Path) -> str:
    """`models--org--name/...` -> `org/name` (HF cache layout), otherwise the relative dir."""
    for part in relative.parts:
        if part.startswith(_HF_CACHE_PREFIX):
            return part[len(_HF_CACHE_PREFIX) :].replace("--", "/")
    return relative.as_posix()


def discover_models(root: str | os.PathLike[str]) -> dict[str, Path]:
    """Model name -> directory holding a tokenizer.json, for every one under ``root``.

    Inside a ``models--org--name`` tree (a copied HF cache) the snapshot that ``refs/main``
    names wins; otherwise the first found in sorted order.
    """
    base = Path(root)
    found: dict[str, Path] = {}
    if not base.is_dir():
        return found
    for directory, subdirs, files in os.walk(base, followlinks=True):
        subdirs.sort()
        if TOKENIZER_FILE not in files:
            continue
        path = Path(directory)
        name = _model_name_from_path(path.relative_to(base))
        if name in ("", "."):
            continue
        preferred = _preferred_snapshot(path)
        if name not in found or preferred:
            found[name] = path
    return found


def _preferred_snapshot(path: Path) -> bool:
    """True when ``path`` is the snapshot ``refs/main`` of its HF-cache repository points to."""
    if path.parent.name != "snapshots":
        return False
    ref = path.parent.parent / "refs" / "main"
    try:
        return ref.read_text().strip() == path.name
    except OSError:
        return False


def _hf_cache_snapshot(cache: Path, model: str) -> Path | None:
    repo = cache / (_HF_CACHE_PREFIX + model.replace("/", "--"))
    snapshots = repo / "snapshots"
    if not snapshots.is_dir():
        return None
    try:
        revision = (repo / "refs" / "main").read_text().strip()
    except OSError:
        revision = ""
    if revision and (snapshots / revision / TOKENIZER_FILE).is_file():
        return snapshots / revision
    candidates = sorted(
        (p for p in snapshots.iterdir() if (p / TOKENIZER_FILE).is_file()),
        key=lambda p: p.stat().st_mtime,
    )
    return candidates[-1] if candidates else None


def _hub_reachable(timeout: float) -> tuple[bool, str]:
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    parsed = urlparse(endpoint)
    host = parsed.hostname or ""
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True, endpoint
    except OSError as exc:
        return False, f"{endpoint} unreachable ({exc.strerror or exc})"


class TokenizerResolver:
    """Maps a model name to a tokenizer source, trying each allowed source in a fixed order.

    Order: explicit per-model paths, the local models directory (auto-discovered once), the HF
    cache, then the hub (only when allowed, not offline and reachable within a short timeout).
    """

    def __init__(
        self,
        explicit: Mapping[str, str] | None = None,
        *,
        models_dir: str | None = None,
        hf_cache: str | None = None,
        allow_hub: bool = False,
        hub_timeout: float = 2.0,
    ) -> None:
        self.explicit = dict(explicit or {})
        self.models_dir = models_dir
        self.hf_cache = _hf_cache_root(hf_cache)
        self.allow_hub = allow_hub
        self.hub_timeout = hub_timeout
        self._discovered: dict[str, Path] | None = None
        self._lock = threading.Lock()

    def discovered(self) -> dict[str, Path]:
        """The models found under the models directory (scanned once)."""
        with self._lock:
            if self._discovered is None:
                self._discovered = discover_models(self.models_dir) if self.models_dir else {}
            return self._discovered

    def resolve(self, model: str) -> TokenizerSource:
        """The first source that has the model's tokenizer; raises naming every place tried."""
        tried: list[str] = []
        if model in self.explicit:
            path = Path(self.explicit[model]).expanduser()
            directory = path.parent if path.name.endswith(".json") else path
            if (directory / TOKENIZER_FILE).is_file() or path.is_file():
                return TokenizerSource(model, "explicit", str(path))
            raise TokenizerNotFoundError(
                f"tokenizer for model {model!r}: configured path {str(path)!r} has no "
                f"{TOKENIZER_FILE}"
            )
        tried.append("no explicit path")
        if self.models_dir:
            local = self.discovered().get(model)
            if local is not None:
                return TokenizerSource(model, "models_dir", str(local))
            tried.append(f"not under models dir {self.models_dir!r}")
        snapshot = _hf_cache_snapshot(self.hf_cache, model)
        if snapshot is not None:
            return TokenizerSource(model, "hf_cache", str(snapshot))
        tried.append(f"not in HF cache {str(self.hf_cache)!r}")
        if not self.allow_hub:
            tried.append("hub disabled (tokenization.allow_hub=false)")
        elif os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
            tried.append("hub skipped (HF_HUB_OFFLINE is set)")
        else:
            reachable, detail = _hub_reachable(self.hub_timeout)
            if reachable:
                return TokenizerSource(model, "hub", model)
            tried.append(f"hub {detail}")
        raise TokenizerNotFoundError(f"no tokenizer for model {model!r}: " + "; ".join(tried))


@dataclass(frozen=True, slots=True)
class BoundaryTokens:
    """Added tokens at whose start a prompt can be cut without changing its tokenization.

    The Rust tokenizer splits the text on added tokens before normalising, pre-tokenising and
    running the model on each piece separately, so a cut right before an added token that is
    matched on the raw text (``normalized=False``) and does not reach left (``lstrip``,
    ``single_word``) leaves the pieces on both sides unchanged. ``lookahead`` is how far past a
    cut the added-token matcher may look (the longest added token): texts must agree that far
    for the cut to be valid in both. See docs/tokenization.md for the full argument.
    """

    ids: frozenset[int]
    pattern: re.Pattern[str] | None
    lookahead: int


def _boundary_tokens(backend: Any) -> BoundaryTokens:
    added: dict[int, Any] = backend.get_added_tokens_decoder()
    longest = max((len(tok.content) for tok in added.values()), default=0)
    split_specials = bool(getattr(backend, "encode_special_tokens", False))
    eligible: dict[int, str] = {}
    for token_id, tok in added.items():
        content = tok.content
        if not content or content[0].isspace() or tok.normalized or tok.lstrip:
            continue
        if tok.single_word or (tok.special and split_specials):
            continue
        eligible[token_id] = content
    if not eligible:
        return BoundaryTokens(frozenset(), None, longest)
    # Longest first: at one position Python's regex takes the first alternative, the Rust
    # matcher the longest token; candidates are only hints, every cut is verified anyway.
    contents = sorted(set(eligible.values()), key=lambda text: (-len(text), text))
    pattern = re.compile("|".join(re.escape(text) for text in contents))
    return BoundaryTokens(frozenset(eligible), pattern, max(longest, 1))


def _special_template(backend: Any) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """(prefix, suffix) ids the post-processor adds to one sequence, or None if not constant."""
    found: set[tuple[tuple[int, ...], tuple[int, ...]]] = set()
    for probe in ("a b c", "Hello, world!\n\n  x"):
        bare = backend.encode(probe, add_special_tokens=False)
        full = backend.post_process(bare, None, True).ids
        ids = bare.ids
        for start in range(len(full) - len(ids) + 1):
            if full[start : start + len(ids)] == ids:
                found.add((tuple(full[:start]), tuple(full[start + len(ids) :])))
                break
        else:
            return None
    return found.pop() if len(found) == 1 else None


@dataclass(eq=False)
class LoadedTokenizer:
    """A model's tokenizer as vLLM loads it, plus what the prefix store needs to cut prompts."""

    model: str
    source: TokenizerSource
    backend: Any
    """Private ``tokenizers.Tokenizer`` copy: no truncation or padding configured."""
    hf: Any = None
    """The transformers tokenizer (templates, special tokens map) when transformers loaded it."""
    chat_template: str | dict[str, str] | None = None
    special_tokens_map: dict[str, str] = field(default_factory=dict)
    truncation_side: str = "left"
    uid: int = field(default_factory=lambda: next(_uids))

    def __post_init__(self) -> None:
        self.boundaries = _boundary_tokens(self.backend)
        self.specials = _special_template(self.backend)
        self._truncating: Any = None
        self._truncation_lock = threading.Lock()
        self._max_chars_per_token: int | None = None

    def encode(self, text: str, *, add_special_tokens: bool) -> list[int]:
        """Fresh token ids, exactly ``tokenizer(text, add_special_tokens=...)["input_ids"]``."""
        ids: list[int] = self.backend.encode(text, add_special_tokens=add_special_tokens).ids
        return ids

    def encode_bare(self, text: str) -> Any:
        """The ``tokenizers.Encoding`` of ``text`` without special tokens (ids and offsets)."""
        return self.backend.encode(text, add_special_tokens=False)

    def encode_batch(self, texts: Sequence[str], *, add_special_tokens: bool) -> list[list[int]]:
        """Several prompts at once (the Rust side parallelises the batch)."""
        encodings = self.backend.encode_batch(list(texts), add_special_tokens=add_special_tokens)
        return [encoding.ids for encoding in encodings]

    def with_specials(self, bare_ids: list[int]) -> list[int]:
        """``bare_ids`` with the post-processor's special tokens added (constant templates)."""
        if self.specials is None:
            raise TokenizationError(f"{self.model}: post-processor specials are not constant")
        prefix, suffix = self.specials
        if not prefix and not suffix:
            return bare_ids
        return [*prefix, *bare_ids, *suffix]

    def encode_truncated(
        self, text: str, *, add_special_tokens: bool, max_length: int, side: str
    ) -> list[int]:
        """Tokenizer-level truncation, as ``tokenizer(text, truncation=True, max_length=N)``.

        The Rust tokenizer truncates the text's tokens to leave room for the special tokens it
        adds, so a left-truncated completion keeps its BOS. A locked private copy runs it.
        """
        with self._truncation_lock:
            if self._truncating is None:
                self._truncating = copy.deepcopy(self.backend)
            self._truncating.enable_truncation(
                max_length=max_length, stride=0, strategy="longest_first", direction=side
            )
            try:
                ids: list[int] = self._truncating.encode(
                    text, add_special_tokens=add_special_tokens
                ).ids
            except Exception as exc:
                raise TokenizationError(
                    f"truncation to {max_length} tokens failed: {exc}"
                ) from None
        return ids

    @property
    def max_chars_per_token(self) -> int:
        """vLLM's bound used to pre-trim huge texts: the longest vocabulary entry."""
        if self._max_chars_per_token is None:
            vocab = self.hf.get_vocab() if self.hf is not None else self.backend.get_vocab(True)
            self._max_chars_per_token = max((len(token) for token in vocab), default=1)
        return self._max_chars_per_token

    def resolve_chat_template(self, chat_template: str | None, tools: object) -> str:
        """vLLM's template choice: the given one (or a named one), else the model's."""
        if self.hf is not None and hasattr(self.hf, "get_chat_template"):
            try:
                resolved: str = self.hf.get_chat_template(chat_template, tools=tools)
            except ValueError as exc:
                raise ChatTemplateError(f"{self.model}: {exc}") from None
            return resolved
        template = self.chat_template
        if isinstance(template, dict):
            if chat_template is not None and chat_template in template:
                return template[chat_template]
            if chat_template is None:
                if tools is not None and "tool_use" in template:
                    return template["tool_use"]
                if "default" in template:
                    return template["default"]
                raise ChatTemplateError(f"{self.model}: several chat templates, none is default")
        if chat_template is not None:
            return chat_template
        if not isinstance(template, str):
            raise ChatTemplateError(
                f"{self.model}: the tokenizer defines no chat template; pass chat_template "
                "(vLLM refuses such requests too)"
            )
        return template


def _import_tokenizers() -> Any:
    try:
        import tokenizers
    except ImportError:
        raise MissingDependencyError("tokenizers") from None
    return tokenizers


def _transformers_available() -> bool:
    try:
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _token_text(value: object) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        content: str = value["content"]
        return content
    return None


def _files_chat_template(directory: Path) -> str | dict[str, str] | None:
    """The template transformers would load: chat_template.jinja, else tokenizer_config.json."""
    jinja = directory / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    config = _read_json(directory / "tokenizer_config.json")
    template = config.get("chat_template")
    if isinstance(template, list):
        return {item["name"]: item["template"] for item in template if isinstance(item, dict)}
    if isinstance(template, str):
        return template
    return None


def load_tokenizer(
    source: TokenizerSource, *, use_transformers: bool | None = None
) -> LoadedTokenizer:
    """Load the tokenizer a source names (never downloads unless the source is the hub)."""
    tokenizers = _import_tokenizers()
    path = Path(source.location)
    if source.origin != "hub" and path.is_file():
        directory = path.parent
        bare_file: Path | None = path
    else:
        directory = path
        bare_file = None
    if use_transformers is None:
        use_transformers = _transformers_available() and (
            source.origin == "hub" or bare_file is None or bare_file.name == TOKENIZER_FILE
        )
    if use_transformers:
        return _load_with_transformers(source, directory, tokenizers)
    if bare_file is None:
        bare_file = directory / TOKENIZER_FILE
    try:
        backend = tokenizers.Tokenizer.from_file(str(bare_file))
    except Exception as exc:
        raise TokenizationError(f"cannot load {str(bare_file)!r}: {exc}") from None
    backend.no_truncation()
    backend.no_padding()
    config = _read_json(directory / "tokenizer_config.json")
    specials = {
        key: text
        for key in ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token")
        if (text := _token_text(config.get(key))) is not None
    }
    return LoadedTokenizer(
        model=source.model,
        source=source,
        backend=backend,
        chat_template=_files_chat_template(directory),
        special_tokens_map=specials,
    )


def _load_with_transformers(
    source: TokenizerSource, directory: Path, tokenizers: Any
) -> LoadedTokenizer:
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise MissingDependencyError("transformers") from None
    location = source.model if source.origin == "hub" else str(directory)
    try:
        hf = AutoTokenizer.from_pretrained(
            location,
            truncation_side="left",
            trust_remote_code=False,
            local_files_only=source.origin != "hub",
        )
    except Exception as exc:
        raise TokenizationError(f"cannot load tokenizer from {location!r}: {exc}") from None
    backend = getattr(hf, "backend_tokenizer", None)
    if not isinstance(backend, tokenizers.Tokenizer):
        raise TokenizationError(
            f"{source.model}: {type(hf).__name__} has no Rust (fast) tokenizer; "
            "only tokenizer.json based tokenizers are supported"
        )
    backend = copy.deepcopy(backend)
    backend.no_truncation()
    backend.no_padding()
    backend.encode_special_tokens = bool(getattr(hf, "split_special_tokens", False))
    specials = {k: str(v) for k, v in hf.special_tokens_map.items() if isinstance(v, str)}
    return LoadedTokenizer(
        model=source.model,
        source=source,
        backend=backend,
        hf=hf,
        chat_template=hf.chat_template,
        special_tokens_map=specials,
        truncation_side=str(getattr(hf, "truncation_side", "left")),
    )


class TokenizerRegistry:
    """Resolves and loads tokenizers per model, keeping the ``capacity`` most recently used.

    Concurrent first requests for one model load it once.
    """

    def __init__(self, resolver: TokenizerResolver, *, capacity: int = 20) -> None:
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        self.resolver = resolver
        self.capacity = capacity
        self._loaded: OrderedDict[str, LoadedTokenizer] = OrderedDict()
        self._lock = threading.Lock()
        self._loading: dict[str, threading.Lock] = {}
        self.loads = 0

    def get(self, model: str) -> LoadedTokenizer:
        """The model's tokenizer, loading it on first use."""
        with self._lock:
            tokenizer = self._loaded.get(model)
            if tokenizer is not None:
                self._loaded.move_to_end(model)
                return tokenizer
            gate = self._loading.setdefault(model, threading.Lock())
        with gate:
            with self._lock:
                tokenizer = self._loaded.get(model)
            if tokenizer is not None:
                return tokenizer
            tokenizer = load_tokenizer(self.resolver.resolve(model))
            with self._lock:
                self.loads += 1
                self._loaded[model] = tokenizer
                self._loaded.move_to_end(model)
                while len(self._loaded) > self.capacity:
                    self._loaded.popitem(last=False)
                self._loading.pop(model, None)
        return tokenizer

    def put(self, model: str, tokenizer: LoadedTokenizer) -> None:
        """Register an already loaded tokenizer under ``model`` (tests, custom sources)."""
        with self._lock:
            self._loaded[model] = tokenizer
            self._loaded.move_to_end(model)
            while len(self._loaded) > self.capacity:
                self._loaded.popitem(last=False)

    def loaded(self) -> list[str]:
        """Models currently loaded, least recently used first."""
        with self._lock:
            return list(self._loaded)
