"""The specialist's prompt for one input: the task's own system prompt and template.

Trained specialists see only the short prompt from the task file. Untrained models
(zero-/k-shot) additionally need to be told the label set or the schema: `instructed=True`
appends it to the system prompt.
"""

from __future__ import annotations

import json

from .spec import Task


def instructions(task: Task) -> str:
    if task.kind == "classification" and task.labels:
        lines = [f"- {label}" + (f": {task.label_descriptions[label]}" if label in task.label_descriptions else "")
                 for label in task.labels]
        return "Answer with exactly one of these labels and nothing else:\n" + "\n".join(lines)
    if task.kind == "extraction" and task.json_schema is not None:
        return "Answer with one JSON object that follows this JSON schema, and nothing else:\n" + json.dumps(
            task.json_schema)
    return ""


def specialist_messages(task: Task, text: str, *, instructed: bool = False,
                        shots: list[tuple[str, str]] = ()) -> list[dict]:
    system = task.prompt.system or ""
    if instructed:
        extra = instructions(task)
        system = f"{system}\n\n{extra}".strip() if extra else system
    messages = [{"role": "system", "content": system}] if system else []
    for shot_input, shot_output in shots:
        messages.append({"role": "user", "content": task.prompt.template.replace("{input}", shot_input)})
        messages.append({"role": "assistant", "content": shot_output})
    messages.append({"role": "user", "content": task.prompt.template.replace("{input}", text)})
    return messages
