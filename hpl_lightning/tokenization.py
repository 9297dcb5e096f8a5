"""Chat-template tokenization with assistant-only scoring, and the over-long sequence policy.

Conversations are rendered with the model's own chat template. The scored tokens of assistant message ``i`` are the
ones between the rendering of ``messages[:i]`` with the generation prompt and the rendering of ``messages[:i+1]``:
exactly what the model generates for that turn (its end-of-turn token included), the same split TRL's DPO trainer
makes between prompt and completion. Observations, instructions and the task statement are context only.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Literal

from transformers import PreTrainedTokenizerBase

from hpl_lightning.errors import DataError
from hpl_lightning.schema import Record, Trajectory, head_length

# Turns dropped at a time when a conversation outgrows its window (training and rollouts alike): 4 re-encodes a
# cached context once every ~4 turns, at the cost of up to 3 turns of history the window could still have held.
HISTORY_BLOCK = 4

OverlongPolicy = Literal["truncate", "drop", "error"]
UnscorablePolicy = Literal["error", "drop"]


@dataclass(frozen=True)
class TokenizedSequence:
    """``input_ids`` and, per position, whether that token is an agent token whose log-prob is scored."""

    input_ids: list[int]
    scored: list[bool]

    @property
    def n_scored(self) -> int:
        return sum(self.scored)


@dataclass(frozen=True)
class Example:
    """One training item: a preference pair (two sequences) or a behaviour-cloning trajectory (``rejected`` None)."""

    id: str
    task_id: str
    level: str  # trajectory | step | group | bc
    chosen: TokenizedSequence
    rejected: TokenizedSequence | None = None
    group_length: int | None = None
    difficulty: float | None = None
    # Precomputed reference log-probs (chosen, rejected) when ``model.reference_cache`` is on; not part of the data.
    ref_logps: tuple[float, float] | None = None


@dataclass
class TokenizationReport:
    """What the over-long policy did, reported before training so nothing is dropped silently."""

    examples: int = 0
    history_truncated: int = 0
    tail_truncated: int = 0
    dropped: Counter = field(default_factory=Counter)

    def summary(self) -> str:
        dropped = ", ".join(f"{n} {why}" for why, n in sorted(self.dropped.items())) or "none"
        return (
            f"{self.examples} examples kept; {self.history_truncated} with oldest history turns removed, "
            f"{self.tail_truncated} cut at the end; dropped: {dropped}"
        )


def truncate_history(
    messages: list[dict[str, str]], protected: int, fits: Callable[[list[dict[str, str]]], bool],
    block: int = HISTORY_BLOCK,
) -> list[dict[str, str]]:
    """``messages`` with the oldest turns after the first ``protected`` (the task head) removed, ``block`` turns at a
    time, until ``fits``.

    A turn is an assistant message and the messages up to the next one (its observation). Dropping a multiple of
    ``block`` turns (the fewest that fit, rounded up) keeps the cut in place while an episode grows: its context at
    one turn continues its context at the turn before, until the history outgrows the window again about ``block``
    turns later, so a cached context is re-encoded once per block rather than at every turn. The head and the last
    message are always kept, so the result may still not fit; the caller decides what happens then. Training prompts
    and the agent's context at evaluation and exploration are all cut here, so a policy sees what it was trained on.
    """
    if block < 1:
        raise ValueError(f"block must be >= 1 turn, got {block}")
    last = len(messages) - 1
    # where the kept history starts after dropping k whole turns (cuts[k]); then the last message alone
    cuts = [protected] + [i for i in range(protected + 1, last) if messages[i]["role"] == "assistant"]
    whole = len(cuts)
    cuts += [last] if last > cuts[-1] else []

    def kept(k: int) -> list[dict[str, str]]:
        return messages[:protected] + messages[cuts[k]:]

    for k in range(len(cuts)):
        if fits(kept(k)):
            rounded = min(-(-k // block) * block, max(whole - 1, k))  # not past the last whole turn
            return kept(rounded) if rounded == k or fits(kept(rounded)) else kept(k)
    return kept(len(cuts) - 1)  # nothing fits: the head and the last message


class ChatTokenizer:
    """Turns records into :class:`Example` s under a max length and an explicit over-long policy.

    ``overlong``: ``truncate`` removes the oldest history turns of the prompt (never the task statement), then cuts
    the end of the sequence; ``drop`` drops over-long items; ``error`` stops. ``unscorable`` decides what happens to
    an item left with no agent token to score: ``error`` (default) or ``drop``; both are reported.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        max_length: int,
        overlong: OverlongPolicy = "truncate",
        unscorable: UnscorablePolicy = "error",
    ):
        if not tokenizer.chat_template:
            raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has no chat template; set one before training")
        self.tokenizer, self.max_length, self.overlong, self.unscorable = tokenizer, max_length, overlong, unscorable

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def encode(self, messages: list[dict[str, str]], score_from: int) -> TokenizedSequence:
        """Tokenizes a conversation, scoring the assistant messages at index >= ``score_from``."""
        text = self.render(messages)
        spans = []
        for i in range(score_from, len(messages)):
            if messages[i]["role"] != "assistant":
                continue
            before, upto = self.render(messages[:i], add_generation_prompt=True), self.render(messages[: i + 1])
            if not (text.startswith(before) and text.startswith(upto) and len(before) <= len(upto)):
                raise ValueError(
                    "the chat template does not render conversations prefix-stably (rendering the first turns alone "
                    "differs from the start of the whole conversation), so agent tokens cannot be located"
                )
            spans.append((len(before), len(upto)))
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        scored = [any(a <= start < b for a, b in spans) for start, _ in enc["offset_mapping"]]
        return TokenizedSequence(list(enc["input_ids"]), scored)

    def __call__(self, record: Record, report: TokenizationReport, path: str, line: int) -> Example | None:
        """The record's example, or None when the policy drops it (counted in ``report``)."""
        if isinstance(record, Trajectory):
            messages, protected = record.messages, head_length(record.messages)
            sequences = {"messages": (messages, protected)}
        else:
            messages, protected = record.prompt, head_length(record.prompt)
            sequences = {"chosen": (record.prompt + record.chosen, len(record.prompt)),
                         "rejected": (record.prompt + record.rejected, len(record.prompt))}
        encoded = {name: self.encode(msgs, start) for name, (msgs, start) in sequences.items()}
        if self._too_long(encoded):
            if self.overlong == "error":
                longest = max(len(s.input_ids) for s in encoded.values())
                raise DataError(path, line, None, f"{longest} tokens, over max_length {self.max_length}")
            if self.overlong == "drop":
                report.dropped["over-long"] += 1
                return None
            encoded = self._truncate_history(record, encoded, protected, report)
            if self._too_long(encoded):
                report.tail_truncated += 1
                encoded = {
                    k: TokenizedSequence(s.input_ids[: self.max_length], s.scored[: self.max_length])
                    for k, s in encoded.items()
                }
        for name, seq in encoded.items():
            if seq.n_scored == 0:
                if self.unscorable == "error":
                    raise DataError(
                        path, line, name, f"no agent token left to score within max_length {self.max_length}"
                    )
                report.dropped["nothing scorable"] += 1
                return None
        report.examples += 1
        if isinstance(record, Trajectory):
            return Example(record.id, record.task, "bc", encoded["messages"])
        return Example(
            record.id, record.task_id, record.level, encoded["chosen"], encoded["rejected"],
            record.group_length, record.difficulty,
        )

    def _too_long(self, encoded: dict[str, TokenizedSequence]) -> bool:
        return any(len(s.input_ids) > self.max_length for s in encoded.values())

    def _truncate_history(
        self, record: Record, encoded: dict[str, TokenizedSequence], protected: int, report: TokenizationReport
    ) -> dict[str, TokenizedSequence]:
        """Removes the oldest (action, observation) turns after the task statement until the item fits."""
        if isinstance(record, Trajectory):
            return encoded  # every turn after the head is scored: cut the end instead
        encodings = {len(record.prompt): encoded}  # by prompt length: each removal shortens the prompt

        def fits(prompt: list[dict[str, str]]) -> bool:
            if len(prompt) not in encodings:
                encodings[len(prompt)] = {"chosen": self.encode(prompt + record.chosen, len(prompt)),
                                          "rejected": self.encode(prompt + record.rejected, len(prompt))}
            return not self._too_long(encodings[len(prompt)])

        prompt = truncate_history(record.prompt, protected, fits)
        report.history_truncated += len(prompt) < len(record.prompt)
        return encodings[len(prompt)]
