"""Strict YAML reading shared by the policy and the config: positions on every error.

Each error names ``file:line:column``, the key, and what was expected; unknown keys are errors.
"""

from __future__ import annotations

from dataclasses import dataclass

import yaml

STR = "tag:yaml.org,2002:str"


@dataclass(frozen=True, slots=True)
class Issue:
    """One problem found in a YAML file (policy, config), 1-based line and column."""

    path: str
    line: int
    column: int
    message: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}:{self.column}: {self.message}"


class YamlError(ValueError):
    """A file failed to load; ``issues`` lists every problem found."""

    def __init__(self, issues: list[Issue]) -> None:
        super().__init__("\n".join(str(i) for i in issues))
        self.issues = issues


class YamlFile:
    """Validation helpers bound to one file's path and issue list."""

    def __init__(self, path: str, issues: list[Issue]) -> None:
        self.path = path
        self.issues = issues

    def error(self, node: yaml.Node, message: str) -> None:
        mark = node.start_mark
        self.issues.append(Issue(self.path, mark.line + 1, mark.column + 1, message))

    def where(self, node: yaml.Node) -> str:
        return f"{self.path}:{node.start_mark.line + 1}"

    def mapping(self, node: yaml.Node, key: str, allowed: tuple[str, ...]
                ) -> dict[str, tuple[yaml.Node, yaml.Node]]:
        if not isinstance(node, yaml.MappingNode):
            self.error(node, f"key '{key}': expected a mapping")
            return {}
        out: dict[str, tuple[yaml.Node, yaml.Node]] = {}
        for k, v in node.value:
            name = k.value
            if name not in allowed:
                prefix = f"{key}." if key else ""
                self.error(k, f"unknown key '{prefix}{name}' (expected one of: "
                           f"{', '.join(allowed)})")
            elif name in out:
                self.error(k, f"key '{key + '.' if key else ''}{name}' is given twice")
            else:
                out[name] = (k, v)
        return out

    def string(self, node: yaml.Node, key: str) -> str | None:
        if not isinstance(node, yaml.ScalarNode) or node.tag != STR or not node.value:
            self.error(node, f"key '{key}': expected a non-empty string")
            return None
        return str(node.value)

    def strings(self, node: yaml.Node, key: str) -> list[tuple[yaml.Node, str]]:
        """A string or a list of strings."""
        items = node.value if isinstance(node, yaml.SequenceNode) else [node]
        out = []
        for item in items:
            value = self.string(item, key)
            if value is not None:
                out.append((item, value))
        return out

    def choice(self, node: yaml.Node, key: str, choices: tuple[str, ...]) -> str | None:
        if not isinstance(node, yaml.ScalarNode) or node.value not in choices:
            got = node.value if isinstance(node, yaml.ScalarNode) else \
                "a " + type(node).__name__.removesuffix("Node").lower()
            self.error(node, f"key '{key}': expected one of {', '.join(choices)}, got '{got}'")
            return None
        return str(node.value)


def compose(text: str, path: str) -> yaml.Node | None:
    try:
        return yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        problem = getattr(exc, "problem", None) or str(exc)
        raise YamlError([Issue(path, line, col, f"invalid YAML: {problem}")]) from exc
