"""The environment interface shared by evaluation (``evaluate.py``) and data generation (rollouts).

An episode is a ReAct conversation (as in ETO/IPR/HPL):
``[user: instruction, assistant: "OK", user: task (+ first observation), assistant: "Thought: ...\\nAction: ...",
user: "Observation: ...", ...]``. ``Environment`` turns agent text into actions and returns observations and rewards;
``initial_messages`` / ``observation_message`` build that conversation so every benchmark prompts the same way.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any


class EnvironmentCrashed(RuntimeError):
    """The environment's backend (database server, simulator process) failed; the episode's reward is unknown."""


@dataclass(frozen=True)
class Task:
    id: str
    description: str
    # benchmark-specific; 'max_steps', where set, is the turn budget an evaluation episode gets (sciworld: ETO's
    # per type), which exploration's trajectory level plays to when it lifts the environment's own budget
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class StepResult:
    observation: str
    reward: float
    done: bool
    info: dict[str, Any] = field(default_factory=dict)


class Environment(ABC):
    """One episode at a time; ``reset`` starts a task, ``step`` takes the agent's action string."""

    benchmark: str
    max_turns: int
    instruction: str  # first user message: what the agent is and which actions exist

    @abstractmethod
    def tasks(self, split: str) -> list[Task]:
        """The tasks of a split (e.g. 'train', 'test', 'dev')."""

    @abstractmethod
    def reset(self, task: Task) -> str:
        """Starts an episode; returns the first observation to append to the task description ('' if none)."""

    @abstractmethod
    def step(self, action: str) -> StepResult:
        """Executes one parsed action (see ``parse_action``)."""

    def close(self) -> None:  # noqa: B027 - optional for environments without resources
        """Releases processes, connections, temporary databases."""

    def __enter__(self) -> "Environment":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def parse_action(text: str) -> str | None:
    """The text after the last ``Action:`` (first line only), or None when the agent wrote no action."""
    matches = list(re.finditer(r"Action:", text))
    if not matches:
        return None
    action = text[matches[-1].end():].strip().split("\n")[0].strip()
    return action or None


def initial_messages(env: Environment, task: Task, first_observation: str = "") -> list[dict[str, str]]:
    task_text = task.description if not first_observation else f"{task.description}\n{first_observation}"
    return [
        {"role": "user", "content": env.instruction},
        {"role": "assistant", "content": "OK"},
        {"role": "user", "content": task_text},
    ]


def observation_message(observation: str) -> dict[str, str]:
    return {"role": "user", "content": f"Observation: {observation}"}
