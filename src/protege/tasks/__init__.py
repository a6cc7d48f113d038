"""Tasks: what one pipeline step is (a YAML spec), how its outputs are normalised and scored."""

from .spec import Task, load_task

__all__ = ["Task", "load_task"]
