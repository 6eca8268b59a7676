"""Images on a process node: the project's own two images, read from their Dockerfiles and run from the
project's virtualenv. Any other image cannot be "pulled" here."""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
DOCKERFILES = {"qwen-inference": "Dockerfile.inference", "qwen-operator": "Dockerfile.operator"}
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class ImageError(Exception):
    pass


@dataclass
class Image:
    name: str
    entrypoint: list[str] = field(default_factory=list)
    cmd: list[str] = field(default_factory=list)
    workdir: str = "/"
    user: str | None = None
    env: dict[str, str] = field(default_factory=dict)


def repository(image: str) -> str:
    """`ghcr.io/org/qwen-inference:0.1.0@sha256:…` -> `qwen-inference`."""
    ref = image.split("@", 1)[0]
    last = ref.rsplit("/", 1)[-1]
    return last.split(":", 1)[0]


def _instructions(text: str) -> list[tuple[str, str]]:
    lines, buf = [], ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if not buf and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            buf += stripped[:-1] + " "
            continue
        buf += stripped
        if buf:
            word, _, rest = buf.partition(" ")
            lines.append((word.upper(), rest.strip()))
        buf = ""
    return lines


def _expand(value: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m.group(1) or m.group(2), ""), value)


def _exec_form(value: str) -> list[str]:
    import json

    value = value.strip()
    if value.startswith("["):
        return list(json.loads(value))
    return ["/bin/sh", "-c", value]


def parse_dockerfile(name: str, text: str, venv_bin: str) -> Image:
    """The final stage's ENTRYPOINT, CMD, WORKDIR, USER and ENV, following its `FROM <earlier stage>` chain."""
    args: dict[str, str] = {}
    stages: list[tuple[str | None, str, list[tuple[str, str]]]] = []
    for word, rest in _instructions(text):
        if word == "ARG" and not stages:
            key, _, default = rest.partition("=")
            args[key.strip()] = default.strip()
        elif word == "FROM":
            parts = _expand(rest, args).split()
            alias = parts[2] if len(parts) >= 3 and parts[1].upper() == "AS" else None
            stages.append((alias, parts[0], []))
        elif stages:
            stages[-1][2].append((word, rest))
    if not stages:
        raise ImageError(f"{name}: no FROM")
    by_alias = {alias: (base, ins) for alias, base, ins in stages if alias}
    chain = []
    base, ins = stages[-1][1], stages[-1][2]
    chain.append(ins)
    while base in by_alias:
        base, ins = by_alias[base]
        chain.append(ins)
    image = Image(name=name, env={"PATH": f"{venv_bin}:{SYSTEM_PATH}"})
    for ins in reversed(chain):
        for word, rest in ins:
            if word == "ENV":
                for item in shlex.split(rest):
                    key, _, val = item.partition("=")
                    image.env[key] = val
            elif word == "WORKDIR":
                image.workdir = rest
            elif word == "USER":
                image.user = rest
            elif word == "ENTRYPOINT":
                image.entrypoint = _exec_form(rest)
            elif word == "CMD":
                image.cmd = _exec_form(rest)
    return image


def load_images(root: Path = ROOT) -> dict[str, Image]:
    venv_bin = str(root / ".venv" / "bin")
    return {repo: parse_dockerfile(file, (root / file).read_text(), venv_bin) for repo, file in DOCKERFILES.items()}


def traverse_paths(root: Path = ROOT) -> list[str]:
    """Folders on the way to the project and its interpreter that other users cannot pass (a Python under
    /root, say): the container's root file system opens them, for the container only."""
    import os
    import sys

    targets = {Path(os.path.realpath(root / ".venv" / "bin" / "python")), root.resolve(), Path(sys.base_prefix)}
    out = set()
    for t in targets:
        for parent in [t, *t.parents]:
            try:
                if parent.is_dir() and not parent.stat().st_mode & 0o001:
                    out.add(str(parent))
            except OSError:
                pass
    return sorted(out)


def image_paths(root: Path = ROOT) -> list[str]:
    """The folders an image's files live in on a process node: the project (with its virtualenv) and the
    interpreter the virtualenv was made from."""
    import os
    import sys

    return sorted({str(root.resolve()), os.path.realpath(sys.base_prefix)})


def resolve(images: dict[str, Image], image: str) -> Image:
    repo = repository(image)
    if repo not in images:
        raise ImageError(f'image "{image}" is not available on a process node: only the project\'s own images '
                         f"({', '.join(sorted(images))}, any registry and tag) run here")
    return images[repo]
