"""The demo's inference engines: the embedded tiny transformer, and a local Hugging Face model.

An engine turns a prompt into text (greedy, or seeded sampling) and text into an embedding. Each one
runs one request at a time: every public method takes the engine's lock (thread-safe, serialized).
Weights are created inside ``weights_scope()`` and the KV cache inside ``kv_cache_scope()`` (on CUDA,
the demo passes ``allocator.tag("weights")`` and ``allocator.tag("kv_cache")``).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import GpusleepError
from .model import KVCache, TinyTransformer, TinyTransformerConfig
from .tokenizer import ByteTokenizer

__all__ = [
    "ChatMessage",
    "Engine",
    "Generation",
    "GenerationAbortedError",
    "HuggingFaceEngine",
    "SamplingParams",
    "TinyEngine",
]

log = logging.getLogger("gpusleep.demo")

Scope = Callable[[], contextlib.AbstractContextManager]
ChatMessage = tuple[str, str]  #: (role, content)


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  #: 0: greedy
    top_p: float = 1.0
    seed: int | None = None  #: same seed, same weights, same prompt: same text
    stop: tuple[str, ...] = ()


class GenerationAbortedError(RuntimeError, GpusleepError):
    """``generate`` stopped early because its ``should_abort`` said so (a ``mode=abort`` sleep)."""


GenerationAborted = GenerationAbortedError  # the name before every exception ended in Error


@dataclass(frozen=True)
class Generation:
    text: str
    token_ids: tuple[int, ...]
    prompt_tokens: int
    finish_reason: str  #: "stop" (end token or stop string) or "length"


def sample_next(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator, allowed: torch.Tensor | None
) -> int:
    """The next token from last-position ``logits`` [vocab]: argmax when ``temperature == 0``, else
    nucleus sampling with ``generator``. ``allowed``: bool mask of the tokens that may be produced."""
    logits = logits.float()
    if allowed is not None:
        logits = logits.masked_fill(~allowed, float("-inf"))
    if params.temperature <= 0:
        return int(torch.argmax(logits))
    # Shift first: the largest logit becomes 0, so that dividing by a tiny temperature gives -inf, never
    # inf - inf = nan; and divide in float64, where every positive temperature JSON can carry is
    # nonzero (5e-324 is 0 in float32, and 0/0 is nan). A tiny temperature then samples like greedy.
    shifted = (logits - logits.max()).double()
    probs = torch.softmax(shifted / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_probs, dim=-1) - sorted_probs < params.top_p
        probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_probs[keep])
    return int(torch.multinomial(probs, 1, generator=generator))


def _generator(device: torch.device, seed: int | None) -> torch.Generator:
    g = torch.Generator(device=device)
    if seed is None:
        g.seed()
    else:
        g.manual_seed(int(seed))
    return g


def _stop_at(text: str, stop: Sequence[str]) -> str | None:
    cut = [text.index(s) for s in stop if s and s in text]
    return text[: min(cut)] if cut else None


class Engine:
    """What the demo server needs from a model. Subclasses implement the ``_``-prefixed steps."""

    model_name: str
    max_model_len: int
    device: torch.device

    def __init__(self) -> None:
        self._lock = threading.Lock()

    # text <-> tokens (no model weights needed: these keep working while the model sleeps)
    def tokenize(self, text: str) -> list[int]:
        raise NotImplementedError

    def detokenize(self, ids: Sequence[int]) -> str:
        raise NotImplementedError

    def chat_prompt(self, messages: Sequence[ChatMessage]) -> str:
        """The prompt for a chat: ``<|role|>`` lines, ending with the assistant's turn."""
        parts = [f"<|{role}|>\n{content}\n" for role, content in messages]
        return "".join(parts) + "<|assistant|>\n"

    def validate_ids(self, ids: Sequence[int]) -> list[int]:
        """``ids`` as a list, or ``ValueError`` naming the first id outside this model's vocabulary."""
        out = [int(i) for i in ids]
        size = self.vocab_size
        for i in out:
            if not 0 <= i < size:
                raise ValueError(f"token id {i} is outside this model's vocabulary [0, {size})")
        return out

    @property
    def vocab_size(self) -> int:
        raise NotImplementedError

    def check_prompt(self, prompt_ids: Sequence[int]) -> None:
        """``ValueError`` when ``prompt_ids`` leave no room for a generated token."""
        if len(prompt_ids) >= self.max_model_len:
            raise ValueError(
                f"the prompt has {len(prompt_ids)} tokens; this model takes at most {self.max_model_len - 1} "
                "so that one can be generated"
            )

    def generate(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        should_abort: Callable[[], bool] | None = None,
        on_text: Callable[[str], None] | None = None,
    ) -> Generation:
        """Continue ``prompt_ids``; at most ``params.max_tokens`` new tokens, fewer near ``max_model_len``.

        ``should_abort`` is polled before each token; when it returns True, :class:`GenerationAbortedError`
        is raised (the server's ``mode=abort`` sleep uses it to stop the model work it cancels).
        ``on_text`` (streaming) is called, on this thread and under the engine's lock, with each piece of
        the answer as soon as it is final: text that may still turn out to start a stop string, or an
        incomplete UTF-8 character, is held back until it is settled. The pieces add up to the
        returned ``text``."""
        self.check_prompt(prompt_ids)
        budget = min(params.max_tokens, self.max_model_len - len(prompt_ids))
        held_back = max([len(s) - 1 for s in params.stop if s] + [0])
        sent = 0
        with self._lock, torch.inference_mode():
            out: list[int] = []
            if should_abort is not None and should_abort():  # waited for the lock meanwhile
                raise GenerationAbortedError("generation not started: the model is going to sleep")
            generator = _generator(self.device, params.seed)
            finish = "length"
            for token in self._tokens(list(prompt_ids), budget, params, generator):
                if should_abort is not None and should_abort():
                    raise GenerationAbortedError(
                        f"generation stopped after {len(out)} token(s): the model is going to sleep"
                    )
                if token is None:
                    finish = "stop"
                    break
                out.append(token)
                if params.stop and _stop_at(self.detokenize(out), params.stop) is not None:
                    finish = "stop"
                    break
                if on_text is not None:
                    text = self.detokenize(out).rstrip("\ufffd")  # an incomplete character waits for its bytes
                    settled = len(text) - held_back
                    if settled > sent:
                        on_text(text[sent:settled])
                        sent = settled
            text = self.detokenize(out)
            cut = _stop_at(text, params.stop) if params.stop else None
            if cut is not None:  # "" when the answer starts with a stop string
                text = cut
            if on_text is not None and len(text) > sent:
                on_text(text[sent:])
        return Generation(text, tuple(out), len(prompt_ids), finish)

    def embed(self, ids: Sequence[int]) -> list[float]:
        """A unit-length embedding of ``ids``: the mean of the last hidden states."""
        if not ids:
            raise ValueError("cannot embed an empty input")
        if len(ids) > self.max_model_len:
            raise ValueError(f"the input has {len(ids)} tokens; this model takes at most {self.max_model_len}")
        with self._lock, torch.inference_mode():
            hidden = self._hidden(list(ids)).float().mean(dim=0)
            return torch.nn.functional.normalize(hidden, dim=0).cpu().tolist()

    def reload_weights(self) -> None:
        """Put the original weights back in place (after a level-2 sleep discarded them)."""
        raise NotImplementedError

    def _tokens(self, ids: list[int], budget: int, params: SamplingParams, generator: torch.Generator):
        """Yield up to ``budget`` new tokens; ``None`` for the end token."""
        raise NotImplementedError

    def _hidden(self, ids: list[int]) -> torch.Tensor:
        raise NotImplementedError


class TinyEngine(Engine):
    """The embedded model: :class:`TinyTransformer` with seeded weights and a byte tokenizer.

    Its weights are random, so its text is not meaningful; it only produces printable ASCII and
    newlines (the other bytes and the end token are masked out) so that answers stay readable and
    run to ``max_tokens`` or a stop string."""

    def __init__(
        self,
        config: TinyTransformerConfig = TinyTransformerConfig(),  # noqa: B008 - a frozen dataclass
        device: torch.device = torch.device("cpu"),  # noqa: B008 - immutable
        *,
        weights_scope: Scope = contextlib.nullcontext,
        kv_cache_scope: Scope = contextlib.nullcontext,
        model_name: str = "gpusleep-tiny",
    ) -> None:
        super().__init__()
        self.config = config
        self.device = torch.device(device)
        self.model_name = model_name
        self.max_model_len = config.max_seq_len
        self.tokenizer = ByteTokenizer()
        model = TinyTransformer(config).eval()
        with weights_scope():
            self.model = model.to(self.device)
        with kv_cache_scope():
            self.kv_cache = KVCache(config, self.device)
        allowed = torch.zeros(config.vocab_size, dtype=torch.bool)
        allowed[32:127] = True
        allowed[ord("\n")] = True
        self._allowed = allowed.to(self.device)
        log.info(
            "embedded model %s: %d parameters, KV cache %d bytes, on %s",
            model_name,
            sum(p.numel() for p in self.model.parameters()),
            self.kv_cache.num_bytes,
            self.device,
        )

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    def tokenize(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def detokenize(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(self.tokenizer.validate(ids))

    def reload_weights(self) -> None:
        fresh = TinyTransformer(self.config).state_dict()
        with self._lock, torch.no_grad():
            for name, tensor in self.model.state_dict().items():
                tensor.copy_(fresh[name])

    def _ids(self, ids: list[int]) -> torch.Tensor:
        return torch.tensor(ids or [self.tokenizer.bos_id], dtype=torch.long, device=self.device)

    def _tokens(self, ids: list[int], budget: int, params: SamplingParams, generator: torch.Generator):
        prompt = self._ids(ids)
        hidden = self.model(prompt, self.kv_cache, 0)
        pos = prompt.shape[0]
        for step in range(budget):
            token = sample_next(self.model.logits(hidden[-1]), params, generator, self._allowed)
            if token == self.tokenizer.eos_id:
                yield None
                return
            yield token
            if step + 1 < budget and pos < self.max_model_len:
                hidden = self.model(torch.tensor([token], device=self.device), self.kv_cache, pos)
                pos += 1

    def _hidden(self, ids: list[int]) -> torch.Tensor:
        return self.model(self._ids(ids), self.kv_cache, 0)


class HuggingFaceEngine(Engine):
    """A causal language model from a local Hugging Face directory (needs the ``transformers`` package).

    Its weights live under ``weights_scope()``. Its KV cache is the model's own dynamic cache, created
    per request and freed after it, so nothing of it survives a request."""

    def __init__(
        self,
        model_dir: str,
        device: torch.device = torch.device("cpu"),  # noqa: B008 - immutable
        *,
        weights_scope: Scope = contextlib.nullcontext,
    ) -> None:
        super().__init__()
        try:
            from transformers import AutoModelForCausalLM, AutoTokenizer
        except ImportError as exc:
            raise RuntimeError(
                f"--model {model_dir}: loading a Hugging Face model needs the transformers package "
                "(pip install transformers); without --model the embedded demo model needs nothing"
            ) from exc
        path = Path(model_dir)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"--model {model_dir}: no config.json there; give a local Hugging Face model directory"
            )
        self._model_dir = str(path)
        self._auto_model = AutoModelForCausalLM
        self.device = torch.device(device)
        self.model_name = path.name
        self.tokenizer = AutoTokenizer.from_pretrained(self._model_dir)
        model = AutoModelForCausalLM.from_pretrained(self._model_dir, torch_dtype="auto").eval()
        with weights_scope():
            self.model = model.to(self.device)
        self.max_model_len = int(getattr(model.config, "max_position_embeddings", 2048))

    @property
    def vocab_size(self) -> int:
        return int(self.model.get_input_embeddings().num_embeddings)

    def tokenize(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def detokenize(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def chat_prompt(self, messages: Sequence[ChatMessage]) -> str:
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(
                [{"role": r, "content": c} for r, c in messages], tokenize=False, add_generation_prompt=True
            )
        return super().chat_prompt(messages)

    def reload_weights(self) -> None:
        fresh = self._auto_model.from_pretrained(self._model_dir, torch_dtype="auto").state_dict()
        with self._lock, torch.no_grad():
            for name, tensor in self.model.state_dict().items():
                if name in fresh:
                    tensor.copy_(fresh[name])

    def _tokens(self, ids: list[int], budget: int, params: SamplingParams, generator: torch.Generator):
        input_ids = torch.tensor([ids or [self.tokenizer.bos_token_id or 0]], device=self.device)
        past = None
        eos = self.tokenizer.eos_token_id
        for _ in range(budget):
            out = self.model(input_ids=input_ids, past_key_values=past, use_cache=True)
            past = out.past_key_values
            token = sample_next(out.logits[0, -1], params, generator, None)
            if eos is not None and token == eos:
                yield None
                return
            yield token
            input_ids = torch.tensor([[token]], device=self.device)

    def _hidden(self, ids: list[int]) -> torch.Tensor:
        out = self.model(input_ids=torch.tensor([ids], device=self.device), output_hidden_states=True)
        return out.hidden_states[-1][0]
