"""Agent environments: the common interface and one module per benchmark."""

from hpl_lightning.envs.base import (
    Environment,
    EnvironmentCrashed,
    StepResult,
    Task,
    initial_messages,
    observation_message,
    parse_action,
)

__all__ = [
    "Environment",
    "EnvironmentCrashed",
    "StepResult",
    "Task",
    "initial_messages",
    "observation_message",
    "parse_action",
]
