"""Just enough of a Dockerfile parser and a .dockerignore matcher for the deployment tests.

No Docker engine runs here, so the tests read ``deploy/Dockerfile`` the way BuildKit would for the
instructions it uses (stages, COPY, RUN, USER, ENTRYPOINT/CMD in exec form, LABEL, ARG) and
reproduce its build context with the same exclusion rules (moby/patternmatcher: ``*`` and ``?``
stay within one path segment, ``**`` spans segments, ``!`` re-includes, the last matching rule
wins, and a directory that is excluded excludes everything under it).
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

# -- Dockerfile ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    keyword: str  # upper case: FROM, COPY, RUN, ...
    arguments: str  # everything after the keyword, continuation lines joined
    line: int  # where it starts (1-based)

    def exec_form(self) -> list[str] | None:
        """The JSON array of an exec-form RUN/CMD/ENTRYPOINT, or None for the shell form."""
        try:
            value = json.loads(self.arguments)
        except json.JSONDecodeError:
            return None
        if isinstance(value, list) and all(isinstance(item, str) for item in value):
            return value
        return None

    def flags_and_words(self) -> tuple[dict[str, str], list[str]]:
        """``--name=value`` flags before the arguments (COPY, RUN, FROM), then the words."""
        words = shlex.split(self.arguments, posix=True)
        flags: dict[str, str] = {}
        while words and words[0].startswith("--"):
            name, _, value = words.pop(0)[2:].partition("=")
            flags[name] = value
        return flags, words


@dataclass
class Stage:
    index: int
    base: str  # an image reference or an earlier stage's name
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]


@dataclass(frozen=True)
class Copy:
    sources: list[str]
    destination: str
    from_stage: str | None
    line: int


@dataclass
class Dockerfile:
    path: Path
    stages: list[Stage]

    @property
    def final(self) -> Stage:
        return self.stages[-1]

    def stage(self, name: str) -> Stage:
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise AssertionError(f"{self.path}: no stage named {name!r}")

    @property
    def stage_names(self) -> set[str]:
        return {stage.name for stage in self.stages if stage.name}

    def lineage(self, stage: Stage) -> list[Stage]:
        """``stage`` and the stages it is built FROM, nearest first."""
        chain = [stage]
        while chain[-1].base in self.stage_names:
            chain.append(self.stage(chain[-1].base))
        return chain

    def effective(self, stage: Stage, keyword: str) -> Instruction | None:
        """The instruction of this kind in force in ``stage``: its own last one, else inherited."""
        for ancestor in self.lineage(stage):
            found = ancestor.all(keyword)
            if found:
                return found[-1]
        return None

    def labels(self, stage: Stage) -> dict[str, str]:
        """Every LABEL in force in ``stage`` (values unexpanded: ``${VERSION}`` stays)."""
        labels: dict[str, str] = {}
        for ancestor in reversed(self.lineage(stage)):
            for label in ancestor.all("LABEL"):
                labels.update(key_values(label.arguments))
        return labels

    def args(self, stage: Stage) -> dict[str, str | None]:
        """The stage's own ARGs and their defaults (None: no default)."""
        found: dict[str, str | None] = {}
        for arg in stage.all("ARG"):
            for word in shlex.split(arg.arguments):
                name, sep, default = word.partition("=")
                found[name] = default if sep else None
        return found

    def copies(self, stage: Stage) -> list[Copy]:
        result = []
        for instruction in stage.all("COPY"):
            flags, words = instruction.flags_and_words()
            as_json = instruction.exec_form()
            if as_json is not None:
                words = as_json
            assert len(words) >= 2, f"{self.path}:{instruction.line}: COPY needs SRC... DEST"
            result.append(Copy(words[:-1], words[-1], flags.get("from"), instruction.line))
        return result


def key_values(text: str) -> dict[str, str]:
    """``a=1 b="two words"`` (LABEL, ENV) -> {"a": "1", "b": "two words"}."""
    pairs: dict[str, str] = {}
    for word in shlex.split(text, posix=True):
        key, sep, value = word.partition("=")
        assert sep, f"not key=value: {word!r}"
        pairs[key] = value
    return pairs


def parse_dockerfile(path: Path) -> Dockerfile:
    lines = path.read_text("utf-8").splitlines()
    instructions: list[Instruction] = []
    buffer: list[str] = []
    start = 0
    for number, raw in enumerate(lines, 1):
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not buffer):
            continue  # comments (and parser directives) and blank lines, also inside continuations
        if not buffer:
            start = number
        if stripped.endswith("\\"):
            buffer.append(stripped[:-1].strip())
            continue
        buffer.append(stripped)
        text = " ".join(part for part in buffer if part)
        buffer = []
        keyword, _, arguments = text.partition(" ")
        instructions.append(Instruction(keyword.upper(), arguments.strip(), start))
    assert not buffer, f"{path}: the last instruction ends with a line continuation"

    stages: list[Stage] = []
    for instruction in instructions:
        if instruction.keyword == "FROM":
            _, words = instruction.flags_and_words()
            assert len(words) in (1, 3), f"{path}:{instruction.line}: FROM IMAGE [AS NAME]"
            name = None
            if len(words) == 3:
                assert words[1].upper() == "AS", f"{path}:{instruction.line}: FROM IMAGE AS NAME"
                name = words[2].lower()
            stages.append(Stage(len(stages), words[0], name))
        elif instruction.keyword == "ARG" and not stages:
            continue  # global ARGs before the first FROM
        else:
            assert stages, f"{path}:{instruction.line}: {instruction.keyword} before FROM"
            stages[-1].instructions.append(instruction)
    assert stages, f"{path}: no FROM"
    return Dockerfile(path, stages)


# -- .dockerignore -------------------------------------------------------------------------------


@dataclass(frozen=True)
class IgnoreRule:
    pattern: str
    regex: re.Pattern[str]
    negated: bool


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    out = []
    i = 0
    while i < len(pattern):
        char = pattern[i]
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
            continue
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
            continue
        if char == "*":
            out.append("[^/]*")
        elif char == "?":
            out.append("[^/]")
        elif char == "[":
            end = pattern.index("]", i + 1)
            body = pattern[i + 1 : end]
            if body.startswith("^") or body.startswith("!"):
                body = "^" + body[1:]
            out.append(f"[{body}]")
            i = end
        elif char == "\\" and i + 1 < len(pattern):
            out.append(re.escape(pattern[i + 1]))
            i += 1
        else:
            out.append(re.escape(char))
        i += 1
    return re.compile("".join(out) + r"\Z")


def read_dockerignore(path: Path) -> list[IgnoreRule]:
    rules: list[IgnoreRule] = []
    if not path.exists():
        return rules
    for raw in path.read_text("utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        pattern = line[1:].strip() if negated else line
        pattern = str(PurePosixPath(pattern.lstrip("/"))).removeprefix("./")
        rules.append(IgnoreRule(line, _pattern_regex(pattern), negated))
    return rules


def is_ignored(relative: str, rules: list[IgnoreRule]) -> bool:
    """Whether the context path ``relative`` (posix, from the context root) is excluded."""
    parts = PurePosixPath(relative).parts
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    ignored = False
    for rule in rules:
        if any(rule.regex.match(candidate) for candidate in candidates):
            ignored = not rule.negated
    return ignored


def copy_into(context: Path, rules: list[IgnoreRule], source: str, destination: Path) -> int:
    """COPY one context ``source`` (file or directory) to ``destination`` as the builder would:
    a directory's contents (not the directory itself), minus what .dockerignore excludes.
    Returns the number of files copied."""
    assert not any(c in source for c in "*?["), f"COPY wildcards are not emulated: {source!r}"
    origin = context / source
    if origin.is_file():
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(origin, destination)
        return 1
    copied = 0
    for path in sorted(origin.rglob("*")):
        relative = path.relative_to(context).as_posix()
        if path.is_file() and not is_ignored(relative, rules):
            target = destination / path.relative_to(origin)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)
            copied += 1
    return copied
