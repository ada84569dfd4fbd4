"""Strict, bounded YAML reading shared by the policy, the config and the indicator list.

Each error names ``file:line:column``, the key, and what was expected; unknown keys are errors.

Reading is total and bounded: :func:`compose` takes text or bytes and returns a node tree or
raises :class:`YamlError` (never anything else) for any input, in time and memory bounded by
the limits below. A file is refused when it is larger than ``MAX_BYTES``, is not UTF-8, nests
deeper than ``MAX_DEPTH``, or would expand (aliases counted as copies of what they name) to
more than ``MAX_NODES`` nodes: the validators walk the tree, and an alias chain ten wide and
six deep would otherwise make them walk a million nodes. An alias to a node still being
composed (a cycle) is refused too.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, NoReturn

import yaml

STR = "tag:yaml.org,2002:str"
MAX_BYTES = 1 << 20
MAX_DEPTH = 32
MAX_NODES = 20_000
MAX_SHOWN = 80  # characters of a value quoted in a message
MAX_MESSAGE = 400  # characters of one issue's message
MAX_ISSUES = 100  # issues kept per load; the rest are counted
_SMALL_INT = re.compile(r"[0-9]{1,18}", re.ASCII)


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


def shown(value: object) -> str:
    """A value for a message: a scalar's text cut to ``MAX_SHOWN`` characters, else its kind
    (never the repr of a node tree, which may be huge)."""
    if isinstance(value, yaml.ScalarNode):
        value = value.value
    elif isinstance(value, yaml.Node):
        return "a " + type(value).__name__.removesuffix("Node").lower()
    text = str(value)
    return text if len(text) <= MAX_SHOWN else text[:MAX_SHOWN] + "..."


def small_int(text: object) -> int | None:
    """The value of 1 to 18 ASCII digits, else None (no unicode digits, no 4300-digit
    conversions)."""
    if isinstance(text, str) and _SMALL_INT.fullmatch(text):
        return int(text)
    return None


class YamlFile:
    """Validation helpers bound to one file's path and issue list."""

    def __init__(self, path: str, issues: list[Issue]) -> None:
        self.path = path
        self.issues = issues

    def error(self, node: yaml.Node, message: str) -> None:
        """Record an issue at ``node``: messages are cut to ``MAX_MESSAGE`` characters and
        only the first ``MAX_ISSUES`` are kept (an alias fan-out of errors stays small)."""
        mark = node.start_mark
        if len(message) > MAX_MESSAGE:
            message = message[:MAX_MESSAGE] + "..."
        if len(self.issues) < MAX_ISSUES:
            self.issues.append(Issue(self.path, mark.line + 1, mark.column + 1, message))
        elif len(self.issues) == MAX_ISSUES:
            self.issues.append(Issue(self.path, mark.line + 1, mark.column + 1,
                                     f"more than {MAX_ISSUES} problems; the rest are not "
                                     "listed"))

    def where(self, node: yaml.Node) -> str:
        return f"{self.path}:{node.start_mark.line + 1}"

    def mapping(self, node: yaml.Node, key: str, allowed: tuple[str, ...]
                ) -> dict[str, tuple[yaml.Node, yaml.Node]]:
        if not isinstance(node, yaml.MappingNode):
            self.error(node, f"key '{key}': expected a mapping")
            return {}
        out: dict[str, tuple[yaml.Node, yaml.Node]] = {}
        prefix = f"{key}." if key else ""
        for k, v in node.value:
            if not isinstance(k, yaml.ScalarNode):
                self.error(k, f"key '{key}': expected a plain key, got {shown(k)}")
                continue
            name = k.value
            if name not in allowed:
                self.error(k, f"unknown key '{prefix}{shown(name)}' (expected one of: "
                           f"{', '.join(allowed)})")
            elif name in out:
                self.error(k, f"key '{prefix}{name}' is given twice")
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
            self.error(node, f"key '{key}': expected one of {', '.join(choices)}, "
                       f"got '{shown(node)}'")
            return None
        return str(node.value)

    def integer(self, node: yaml.Node, key: str, low: int, high: int,
                expected: str) -> int | None:
        """A whole number ``low..high`` written in ASCII digits, else an error naming
        ``expected``."""
        value = small_int(node.value) if isinstance(node, yaml.ScalarNode) else None
        if value is None or not low <= value <= high:
            self.error(node, f"key '{key}': expected {expected}, got '{shown(node)}'")
            return None
        return value


class _BoundedLoader(yaml.SafeLoader):
    """PyYAML's composer with a depth limit and an expansion budget for aliases."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self._depth = 0
        self._total = 0
        self._weight: dict[int, int] = {}  # id(node) -> nodes it stands for, once complete

    def _refuse(self, message: str, mark: Any) -> NoReturn:
        raise yaml.composer.ComposerError(None, None, message, mark)

    def compose_node(self, parent: yaml.Node | None, index: int) -> yaml.Node | None:
        event = self.peek_event()  # type: ignore[no-untyped-call]
        if isinstance(event, yaml.AliasEvent):
            target = self.anchors.get(event.anchor) if event.anchor else None
            if target is not None:
                weight = self._weight.get(id(target))
                if weight is None:
                    self._refuse(f"alias *{shown(event.anchor)} inside its own anchor",
                                 event.start_mark)
                self._total += weight
                if self._total > MAX_NODES:
                    self._refuse(f"aliases expand this file to more than {MAX_NODES} nodes",
                                 event.start_mark)
            return super().compose_node(parent, index)
        self._depth += 1
        self._total += 1
        if self._depth > MAX_DEPTH:
            self._refuse(f"nested deeper than {MAX_DEPTH} levels", event.start_mark)
        if self._total > MAX_NODES:
            self._refuse(f"more than {MAX_NODES} nodes", event.start_mark)
        node = super().compose_node(parent, index)
        self._depth -= 1
        if node is None:
            return None
        weight = 1
        if isinstance(node, yaml.SequenceNode):
            weight += sum(self._weight.get(id(c), 1) for c in node.value)
        elif isinstance(node, yaml.MappingNode):
            weight += sum(self._weight.get(id(k), 1) + self._weight.get(id(v), 1)
                          for k, v in node.value)
        self._weight[id(node)] = weight
        return node


def _decode(data: bytes, path: str) -> str:
    if len(data) > MAX_BYTES:
        raise YamlError([Issue(path, 1, 1, f"larger than {MAX_BYTES} bytes")])
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise YamlError([Issue(path, line, column, f"not UTF-8 (byte 0x{data[exc.start]:02x})")]
                        ) from None


_FLOW = re.compile(r"""'(?:[^']|'')*'?|"(?:[^"\\]|\\.)*"?|(?:^|(?<=\s))#[^\n]*|[\[\]{}]""")


def _flow_depth(text: str, path: str) -> None:
    """Refuse flow collections (``[`` ``{``) nested deeper than ``MAX_DEPTH`` before PyYAML
    reads them: its scanner looks up to 1,024 characters ahead at every open level, which
    costs a tenth of a second before the composer's own depth check is reached. Quoted
    scalars and comments are skipped; a bracket inside a plain scalar counts (harmless short
    of 32 unclosed ones)."""
    depth = 0
    for m in _FLOW.finditer(text):
        token = m.group()
        if token in ("[", "{"):
            depth += 1
            if depth > MAX_DEPTH:
                line = text.count("\n", 0, m.start()) + 1
                column = m.start() - (text.rfind("\n", 0, m.start()) + 1) + 1
                raise YamlError([Issue(path, line, column, "invalid YAML: nested deeper "
                                       f"than {MAX_DEPTH} levels")])
        elif token in ("]", "}"):
            depth = max(0, depth - 1)


def compose(data: str | bytes, path: str) -> yaml.Node | None:
    """The node tree of one YAML document (None when empty); raises YamlError, only."""
    text = _decode(data, path) if isinstance(data, bytes) else data
    if len(text) > MAX_BYTES:
        raise YamlError([Issue(path, 1, 1, f"larger than {MAX_BYTES} characters")])
    _flow_depth(text, path)
    loader = None
    try:
        loader = _BoundedLoader(text)  # its reader already refuses unprintable characters
        node: yaml.Node | None = loader.get_single_node()
        return node
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        problem = getattr(exc, "problem", None) or str(exc)
        raise YamlError([Issue(path, line, col, f"invalid YAML: {problem}")]) from None
    except RecursionError:  # a safety net: MAX_DEPTH keeps the composer far from the limit
        raise YamlError([Issue(path, 1, 1, "invalid YAML: nested too deeply")]) from None
    finally:
        if loader is not None:
            loader.dispose()


def read(path: str) -> bytes:
    """The bytes of a file (at most ``MAX_BYTES`` + 1); raises YamlError when unreadable."""
    try:
        with open(path, "rb") as fh:
            return fh.read(MAX_BYTES + 1)
    except OSError as exc:
        raise YamlError([Issue(path, 1, 1, f"cannot read: {exc.strerror or exc}")]) from None
