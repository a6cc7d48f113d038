"""The task spec: one YAML file per pipeline step.

    # protege dataset build examples/banking77/task.yaml
    name: banking77
    kind: classification            # classification | generation | extraction
    traces: {task: banking77}        # which stored traces belong to this step
    labels_file: categories.json     # classification: the label set
    prompt:
      system: Classify the customer's message into one banking intent.
    references: frontier             # frontier (recorded replies) | feedback | test_file

Every problem in a file is reported at once, each with its line and key
(`task.yaml:7: split.method: ...`), so a user fixes the file in one pass.
"""

from __future__ import annotations

import json
from datetime import date, datetime
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..errors import ProtegeError

KINDS = ("classification", "generation", "extraction")
DEFAULT_METRICS = {
    "classification": ["accuracy", "macro_f1"],
    "generation": ["exact_match", "chrf", "rouge_l"],
    "extraction": ["json_valid", "field_f1"],
}
PII_KINDS = ("email", "phone", "card", "iban")


class TaskError(ProtegeError):
    """A task file is invalid; the message lists every problem."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TraceFilter(_Strict):
    """Which stored traces belong to the task."""

    task: str | None = None
    """The task tag the traces carry (X-Protege-Task / metadata.protege_task / --task)."""
    models: list[str] | None = None
    """Only traces answered by one of these models."""
    sources: list[Literal["proxy", "sdk", "import", "serve", "shadow"]] | None = None
    """Only traces of these sources. Unset: every source but protege serve's own (serve,
    shadow), which `protege retrain` reads, taking only the frontier's answers from them."""
    since: datetime | date | None = None
    """Only traces created at or after this time (ISO-8601)."""
    until: datetime | date | None = None
    """Only traces created before this time (ISO-8601)."""
    include_errors: bool = False
    """Keep error traces (they are dropped by default, and the drop is counted)."""
    metadata: dict[str, Any] = Field(default_factory=dict)
    """Equality filters on trace metadata keys."""


class Prompt(_Strict):
    """The specialist's own prompt: it need not see the frontier model's long system prompt."""

    system: str | None = None
    """System message for the specialist; None sends none."""
    template: str = "{input}"
    """User message; `{input}` is the trace's last user message."""
    few_shot: int = Field(0, ge=0, le=32)
    """k-shot prompting for untrained models: k training examples before the input."""

    @field_validator("template")
    @classmethod
    def _has_input(cls, v: str) -> str:
        if "{input}" not in v:
            raise ValueError("must contain the placeholder {input}")
        return v


class Normalize(_Strict):
    """How outputs (reference and candidate alike) are normalised before scoring."""

    strip: bool = True
    lowercase: bool = False
    collapse_whitespace: bool = True
    strip_punctuation: bool = False


class Split(_Strict):
    method: Literal["stratified", "temporal", "random"] = "stratified"
    """stratified (by label; classification only), temporal (oldest train, newest test) or random."""
    test_fraction: float = Field(0.2, gt=0, lt=1)
    validation_fraction: float = Field(0.1, ge=0, lt=1)
    seed: int = 0
    group_by: str | None = None
    """A trace metadata key (e.g. dialog_id): rows sharing its value stay in one split, so
    turns of one conversation never sit on both sides of the benchmark."""
    test: Literal["sample", "reviewed"] = "sample"
    """sample: the test split is drawn (test_fraction) from the rows that carry a human
    correction. reviewed (with `references: feedback`): every reviewed trace is the test
    split and none of them trains; the unreviewed traces train."""

    @model_validator(mode="after")
    def _fractions(self):
        if self.test_fraction + self.validation_fraction >= 1:
            raise ValueError("test_fraction + validation_fraction must be below 1")
        return self


class Dedupe(_Strict):
    exact: bool = True
    near_threshold: float | None = Field(0.9, gt=0, le=1)
    """Jaccard similarity (word 3-grams, MinHash/LSH) at or above which two inputs are
    near-duplicates; null turns near-duplicate removal off."""


class Pii(_Strict):
    redact: list[Literal["email", "phone", "card", "iban"]] = Field(default_factory=lambda: list(PII_KINDS))


class Judge(_Strict):
    candidate: str
    """The judge model as a candidate spec, e.g. openai:gpt-4o@https://api.openai.com/v1."""
    instructions: str = "Which answer better fulfils the request? Judge correctness first, then concision."


class Task(_Strict):
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    kind: Literal["classification", "generation", "extraction"]
    description: str | None = None
    traces: TraceFilter = Field(default_factory=TraceFilter)
    labels: list[str] | None = None
    labels_file: str | None = None
    """A JSON list of label names, relative to the task file."""
    label_descriptions: dict[str, str] = Field(default_factory=dict)
    json_schema: dict[str, Any] | None = Field(None, alias="schema")
    schema_file: str | None = None
    prompt: Prompt = Field(default_factory=Prompt)
    normalize: Normalize = Field(default_factory=Normalize)
    metrics: list[str] | None = None
    """Metric names (accuracy, macro_f1, exact_match, chrf, rouge_l, json_valid, field_f1,
    judge) or a user function as `package.module:function`. Defaults by kind."""
    references: Literal["frontier", "feedback", "test_file"] = "frontier"
    """Where correct outputs come from: the frontier model's recorded replies (scores are
    agreement with it), human corrections stored as trace feedback (`feedback.correction`),
    or the labelled file given with `--test-from`."""
    split: Split = Field(default_factory=Split)
    dedupe: Dedupe = Field(default_factory=Dedupe)
    pii: Pii = Field(default_factory=Pii)
    judge: Judge | None = None
    tokenizer: str = "smollm2-135m"
    """Tokenizer used to count prompt tokens (reported savings name it)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    # filled in by load_task
    path: Path | None = Field(None, exclude=True)

    @model_validator(mode="after")
    def _by_kind(self):
        problems = []
        if self.kind == "classification":
            if not self.labels and not self.labels_file:
                problems.append("classification needs `labels` or `labels_file`")
            if self.labels and len(set(self.labels)) != len(self.labels):
                problems.append("`labels` has duplicates")
            unknown = set(self.label_descriptions) - set(self.labels or [])
            if self.labels and unknown:
                problems.append(f"`label_descriptions` names labels not in `labels`: {sorted(unknown)}")
        if self.kind == "extraction" and self.json_schema is None and not self.schema_file:
            problems.append("extraction needs `schema` or `schema_file` (a JSON schema of the output)")
        if self.split.group_by and self.split.method == "stratified":
            problems.append("split.group_by works with method random or temporal, not stratified")
        if self.split.test == "reviewed" and self.references != "feedback":
            problems.append("split.test reviewed needs `references: feedback` (the review is the trace feedback)")
        if self.split.method == "stratified" and self.kind != "classification":
            problems.append("split.method stratified needs kind classification; use random or temporal")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def metric_names(self) -> list[str]:
        return self.metrics or DEFAULT_METRICS[self.kind]

    def reference_note(self) -> str:
        return {
            "frontier": "scores are agreement with the frontier model's recorded replies; replay is 100% by definition",
            "feedback": "scores are against human corrections stored as trace feedback",
            "test_file": "scores are against the labelled test file's references",
        }[self.references]


def _line_of(node: yaml.Node, path: tuple) -> int | None:
    """The 1-based line of the YAML node at `path` (keys and list indices), or of its deepest parent."""
    line = node.start_mark.line + 1
    for key in path:
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                if k.value == key:
                    line, node = k.start_mark.line + 1, v
                    break
            else:
                return line
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            node = node.value[key]
            line = node.start_mark.line + 1
        else:
            return line
    return line


def load_task(path: str | Path) -> Task:
    """Read, validate and resolve a task file (labels_file and schema_file are loaded)."""
    path = Path(path)
    try:
        text = path.read_text("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise TaskError(f"{path}: cannot read task file: {exc}") from None
    try:
        node = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise TaskError(f"{where}: not valid YAML: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(data, dict):
        raise TaskError(f"{path}: a task file is a YAML mapping (name, kind, traces, ...), found {type(data).__name__}")
    try:
        task = Task.model_validate(data)
    except ValidationError as exc:
        lines = []
        for e in exc.errors():
            loc = tuple(x for x in e["loc"] if not (isinstance(x, str) and x.startswith("function-")))
            key = ".".join(str(x) for x in loc) or "(top level)"
            line = _line_of(node, loc) if node is not None else None
            msg = e["msg"].removeprefix("Value error, ")
            if e["type"] == "extra_forbidden":
                msg = "unknown key (check the spelling; see docs/tasks.md for the keys)"
            lines.append(f"{path}:{line}: {key}: {msg}")
        raise TaskError(f"{len(lines)} problem(s) in task file:\n  " + "\n  ".join(lines)) from None
    task.path = path.resolve()
    base = path.parent
    if task.labels_file:
        f = base / task.labels_file
        try:
            labels = json.loads(f.read_text("utf-8"))
        except (OSError, ValueError) as exc:
            raise TaskError(f"{path}:{_line_of(node, ('labels_file',))}: labels_file {f}: {exc}") from None
        if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels) or not labels:
            raise TaskError(f"{path}: labels_file {f} must hold a JSON list of label names")
        if task.labels and task.labels != labels:
            raise TaskError(f"{path}: give `labels` or `labels_file`, not two different lists")
        task.labels = labels
    if task.schema_file:
        f = base / task.schema_file
        try:
            task.json_schema = json.loads(f.read_text("utf-8"))
        except (OSError, ValueError) as exc:
            raise TaskError(f"{path}:{_line_of(node, ('schema_file',))}: schema_file {f}: {exc}") from None
    if task.json_schema is not None:
        from jsonschema import Draft202012Validator, SchemaError

        try:
            Draft202012Validator.check_schema(task.json_schema)
        except SchemaError as exc:
            raise TaskError(f"{path}: schema is not a valid JSON schema: {exc.message}") from None
    return task
