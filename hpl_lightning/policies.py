"""Policies: whatever writes the agent's next turn, for evaluation and for the data pipeline's rollouts.

A policy maps conversations (``role``/``content`` messages, ending with a user turn) to one assistant turn each.
Every call takes a whole batch, so a caller with many episodes in flight makes one model call per turn:
``LocalPolicy`` runs a Hugging Face model in-process (batched, left-padded ``generate``), ``OpenAIPolicy`` sends the
batch to an OpenAI-compatible server (vLLM, TGI), which batches concurrent requests itself. Both cut the text at
the first stop string (default ``"\\nObservation:"``, as IPR/HPL sample): the agent must not write the observation.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import urllib.error
import urllib.request
from abc import ABC, abstractmethod
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from hpl_lightning.errors import UsageError
from hpl_lightning.models import load_causal_lm, load_tokenizer
from hpl_lightning.schema import head_length
from hpl_lightning.tokenization import truncate_history

Conversation = list[dict[str, str]]
DEFAULT_STOP = ("\nObservation:",)
# New tokens per agent turn, the one default of every command: the longest ReAct thought+action in the InterCode-SQL
# GPT-3.5 trajectories is 120 SmolLM2 tokens. The paper allows 512; the shipped GPU experiment configs say so.
MAX_NEW_TOKENS = 128
# HTTP statuses worth another try: overloaded or restarting servers. Other 4xx are the request's fault.
_RETRY_STATUSES = {408, 409, 425, 429, 500, 502, 503, 504}


def truncate_at_stop(text: str, stop: Sequence[str]) -> str:
    """``text`` up to (not including) the earliest occurrence of any stop string."""
    cut = min((i for s in stop if s and (i := text.find(s)) >= 0), default=len(text))
    return text[:cut]


def request_seed(seed: int, key: str) -> int:
    """A sampling seed for one request, distinct per ``key`` and the same on every run (31 bits, as servers take)."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{key}".encode()).digest()[:4], "big") & 0x7FFFFFFF


def request_keys(conversations: list[Conversation], sent: Counter) -> list[str]:
    """Stable keys for keyless requests: the conversation's digest and how often it was sent before (``sent``
    counts), so repeated prompts still get different samples and a re-run of the same calls the same ones."""
    keys = []
    for messages in conversations:
        digest = hashlib.sha256(json.dumps(messages, sort_keys=True).encode()).hexdigest()
        keys.append(f"{digest}#{sent[digest]}")
        sent[digest] += 1
    return keys


class Policy(ABC):
    """Writes one assistant turn per conversation; ``describe`` identifies it in results (resume checks)."""

    @abstractmethod
    def generate(self, conversations: list[Conversation], keys: Sequence[str] | None = None) -> list[str]:
        """The next assistant message of each conversation, in order. ``keys`` (optional) name each request
        stably (the data pipeline: rollout and turn), for policies that derive a per-request sampling seed."""

    @abstractmethod
    def describe(self) -> dict[str, Any]:
        """What determines the outputs (model and decoding settings), JSON-serialisable."""


class LocalPolicy(Policy):
    """A causal LM run in this process: a hub name, a local or exported directory, ``hpl-tiny``, a GGUF model
    (``smollm2-135m-instruct``), or a Lightning ``.ckpt`` of ``HPLModule`` (its policy, LoRA merged).

    Conversations are rendered with the tokenizer's chat template (``add_generation_prompt``). The context is kept
    within ``max_context`` tokens (default: the model's window) minus ``max_new_tokens``: the oldest turns after the
    task statement go first, as training truncates (``tokenization.truncate_history``); if the head and the last
    observation alone do not fit, the middle of that observation is cut. Generation stops at a stop string (default
    ``"\nObservation:"``), at EOS or the template's end-of-turn token, or after ``max_new_tokens`` (``MAX_NEW_TOKENS``).

    The conversations are left-padded and generated in batches of at most ``batch_size`` (sorted by length): every
    turn recomputes every context, but the decoding steps are shared. ``prefix_cache.PrefixCachePolicy`` computes
    the same text incrementally (each episode continues from its KV cache, shared prefixes encoded once, all
    episodes in one batch) and is the default engine of evaluation and exploration (``prefix_cache.local_policy``).
    Greedy unless ``temperature`` > 0. ``seed`` makes sampling reproducible and initialises config-only models
    (hpl-tiny). ``threads`` caps torch's CPU threads while generating: small models on a busy CPU run many times
    faster on one thread than on threads that contend with other processes.
    """

    def __init__(
        self,
        model: str = "hpl-tiny",
        max_new_tokens: int = MAX_NEW_TOKENS,
        temperature: float = 0.0,
        top_p: float = 1.0,
        stop: Sequence[str] = DEFAULT_STOP,
        batch_size: int = 16,
        dtype: str = "float32",
        device: str = "cpu",
        seed: int = 0,
        threads: int | None = None,
        max_context: int | None = None,
    ):
        self.model_spec, self.max_new_tokens, self.temperature, self.top_p = model, max_new_tokens, temperature, top_p
        self.stop, self.batch_size, self.seed, self.threads = tuple(stop), batch_size, seed, threads
        self._batches = 0  # sampling seeds seed + batch number: reproducible, yet no two batches share samples
        if batch_size < 1:
            raise UsageError(f"batch_size must be >= 1, got {batch_size}")
        if model.endswith(".ckpt"):
            from hpl_lightning.module import HPLModule  # Lightning import only when a checkpoint is asked for

            module = HPLModule.load_from_checkpoint(model, map_location="cpu")
            policy = module.policy.merge_and_unload() if module.lora is not None else module.policy
            self.tokenizer = load_tokenizer(module.hparams.policy)
            self.model = policy.to(dtype=getattr(torch, dtype))
        else:
            self.tokenizer = load_tokenizer(model)
            self.model = load_causal_lm(model, dtype=dtype, seed=seed)
        self.model.to(device).eval()
        self.device = torch.device(device)
        self.tokenizer.padding_side = "left"  # new tokens follow every prompt directly
        window = getattr(self.model.config, "max_position_embeddings", None)
        self.max_context = min(c for c in (max_context, window) if c is not None) if (max_context or window) else None
        if self.max_context is not None and self.max_context <= max_new_tokens:
            raise UsageError(f"max_context {self.max_context} leaves no room for the prompt with max_new_tokens "
                             f"{max_new_tokens}")
        self.eos_token_ids = end_of_turn_ids(self.tokenizer, self.model)

    def describe(self) -> dict[str, Any]:
        spec = str(Path(self.model_spec).resolve()) if Path(self.model_spec).exists() else self.model_spec
        return {"type": "local", "model": spec, "max_new_tokens": self.max_new_tokens,
                "temperature": self.temperature, "top_p": self.top_p, "stop": list(self.stop), "seed": self.seed,
                "max_context": self.max_context}

    def prompt_ids(self, conversation: Conversation) -> list[int]:
        """The tokens the model sees for ``conversation``: its chat rendering, cut to the context budget."""
        def render(messages: Conversation) -> list[int]:
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            return self.tokenizer(text, add_special_tokens=False)["input_ids"]

        if self.max_context is None:
            return render(conversation)
        budget = self.max_context - self.max_new_tokens
        protected = head_length(conversation)
        kept = truncate_history(conversation, protected, lambda m: len(render(m)) <= budget)
        ids = render(kept)
        if len(ids) <= budget:
            return ids
        head = self.tokenizer.apply_chat_template(kept[:protected], tokenize=False)
        n_head = len(self.tokenizer(head, add_special_tokens=False)["input_ids"])
        if n_head >= budget:
            raise UsageError(f"the task statement alone is {n_head} tokens, over the context budget {budget} "
                             f"(max_context {self.max_context} - max_new_tokens {self.max_new_tokens})")
        return ids[:n_head] + ids[len(ids) - (budget - n_head):]  # the last observation's middle goes

    def generate(self, conversations: list[Conversation], keys: Sequence[str] | None = None) -> list[str]:
        # ``keys`` are not needed: one generator, seeded per call, samples every sequence differently
        prompts = [self.prompt_ids(c) for c in conversations]
        out: list[str] = [""] * len(prompts)
        threads = torch.get_num_threads()
        torch.set_num_threads(self.threads or threads)
        try:
            order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
            for start in range(0, len(order), self.batch_size):
                chunk = order[start:start + self.batch_size]
                for i, text in zip(chunk, self._generate_batch([prompts[i] for i in chunk])):
                    out[i] = text
        finally:
            torch.set_num_threads(threads)
        return out

    def _decoding(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"do_sample": self.temperature > 0, "max_new_tokens": self.max_new_tokens,
                                  "eos_token_id": self.eos_token_ids, "pad_token_id": self.tokenizer.pad_token_id}
        if self.temperature > 0:
            kwargs.update(temperature=self.temperature, top_p=self.top_p)
        else:
            kwargs.update(temperature=None, top_p=None, top_k=None)  # silence "ignored sampling flag" warnings
        if self.stop:
            kwargs.update(stop_strings=list(self.stop), tokenizer=self.tokenizer)
        return kwargs

    @contextmanager
    def _seeded(self) -> Iterator[None]:
        """A forked RNG seeded with ``seed`` + the number of generate calls so far."""
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(self.seed + self._batches)
            self._batches += 1
            yield

    @torch.no_grad()
    def _generate_batch(self, prompts: list[list[int]]) -> list[str]:
        batch = self.tokenizer.pad({"input_ids": prompts}, return_tensors="pt").to(self.device)
        with self._seeded():
            generated = self.model.generate(**batch, **self._decoding())
        texts = self.tokenizer.batch_decode(generated[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
        return [truncate_at_stop(t, self.stop) for t in texts]


def end_of_turn_ids(tokenizer: Any, model: Any) -> list[int]:
    """Token ids that end an assistant turn: the model's EOS ids and the special token the chat template writes
    right after an assistant message (ChatML's ``<|im_end|>``), which some checkpoints do not list as EOS."""
    configured = model.generation_config.eos_token_id
    ids = set(configured if isinstance(configured, list) else [configured] if configured is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    probe = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]
    rendered = tokenizer.apply_chat_template(probe, tokenize=False)
    after = rendered[rendered.rindex("y") + 1:]
    following = tokenizer(after, add_special_tokens=False)["input_ids"][:1]
    ids.update(i for i in following if i in tokenizer.all_special_ids)
    return sorted(ids)


class OpenAIPolicy(Policy):
    """An OpenAI-compatible ``/v1/chat/completions`` endpoint (vLLM, TGI, ...), with the standard library only.

    ``concurrency`` requests are in flight at once (threads), so the server can batch a whole turn; a request that
    fails with a connection error, a timeout or a retryable status (429, 5xx) is retried up to ``retries`` times
    with exponential backoff, then the error propagates (a turn is never replaced by an empty answer).
    ``api_key`` defaults to ``$OPENAI_API_KEY``; local servers usually need none. ``seed``: each request gets its
    own seed derived from it and the request's key (:meth:`request_seeds`); None sends no seed (not reproducible).
    """

    def __init__(
        self,
        model: str,
        base_url: str = "http://127.0.0.1:8000/v1",
        api_key: str | None = None,
        temperature: float = 0.0,
        top_p: float = 1.0,
        stop: Sequence[str] = DEFAULT_STOP,
        max_tokens: int = 512,
        timeout: float = 120.0,
        retries: int = 5,
        backoff: float = 1.0,
        concurrency: int = 16,
        seed: int | None = None,
    ):
        self.model, self.url = model, base_url.rstrip("/") + "/chat/completions"
        self.api_key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY")
        self.temperature, self.top_p, self.stop, self.max_tokens = temperature, top_p, tuple(stop), max_tokens
        self.timeout, self.retries, self.backoff, self.concurrency, self.seed = timeout, retries, backoff, concurrency, seed
        self._sent: Counter = Counter()  # times each conversation was sent (keyless requests' seeds)
        if concurrency < 1:
            raise UsageError(f"concurrency must be >= 1, got {concurrency}")

    def describe(self) -> dict[str, Any]:
        return {"type": "openai", "model": self.model, "url": self.url, "max_tokens": self.max_tokens,
                "temperature": self.temperature, "top_p": self.top_p, "stop": list(self.stop), "seed": self.seed}

    def generate(self, conversations: list[Conversation], keys: Sequence[str] | None = None) -> list[str]:
        seeds = self.request_seeds(conversations, keys)
        with ThreadPoolExecutor(min(self.concurrency, max(1, len(conversations)))) as pool:
            return list(pool.map(self.complete, conversations, seeds))

    def request_seeds(self, conversations: list[Conversation], keys: Sequence[str] | None) -> list[int | None]:
        """One seed per request (none when ``seed`` is None), from ``seed`` and the request's key.

        A server such as vLLM seeds each request's sampler with its ``seed``: one seed for every request would make
        the Monte-Carlo completions and group tries from one prompt copies of each other. Without ``keys`` a request
        is keyed by its conversation and how many times this policy has sent that conversation before, so repeated
        prompts still differ and a re-run of the same calls samples the same texts.
        """
        if self.seed is None:
            return [None] * len(conversations)
        if keys is None:
            keys = request_keys(conversations, self._sent)
        return [request_seed(self.seed, key) for key in keys]

    def complete(self, messages: Conversation, seed: int | None = None) -> str:
        """One chat completion, retried on transient failures."""
        body: dict[str, Any] = {"model": self.model, "messages": messages, "temperature": self.temperature,
                                "top_p": self.top_p, "max_tokens": self.max_tokens}
        if self.stop:
            body["stop"] = list(self.stop)
        if seed is not None:
            body["seed"] = seed
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.url, data=json.dumps(body).encode(), headers=headers, method="POST")
        for attempt in range(self.retries + 1):
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    answer = json.loads(response.read())
                return truncate_at_stop(answer["choices"][0]["message"]["content"] or "", self.stop)
            except urllib.error.HTTPError as e:
                if e.code not in _RETRY_STATUSES or attempt == self.retries:
                    detail = e.read().decode(errors="replace")[:500]
                    raise RuntimeError(f"{self.url} answered {e.code} after {attempt + 1} attempt(s): {detail}") from e
            except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
                if attempt == self.retries:
                    raise RuntimeError(f"{self.url} unreachable after {attempt + 1} attempt(s): {e}") from e
            time.sleep(self.backoff * 2**attempt)
        raise AssertionError("unreachable: the last attempt returns or raises")
