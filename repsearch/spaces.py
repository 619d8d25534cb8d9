"""Operation spaces: named sets of branch types (DyRep Table 1; DESIGN.md "Operation spaces").

A space file ``spaces/<name>.yaml`` is ``{name, description, branches: [...]}``. Spaces shipped:
``repvgg`` = {kxk, 1x1, identity}; ``dbb`` = {kxk, 1x1, 1x1-kxk, 1x1-avg}; ``acb`` = {kxk, 1xk, kx1};
``dyrep`` = all 7. ``kxk`` (the original conv's own branch) is always part of a block, listed or not.

The folder is ``<project root>/spaces`` unless the environment variable ``REPSEARCH_SPACES`` names
another one.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Union

import yaml

from repsearch.rep.branches import BRANCH_KINDS

__all__ = ["BRANCH_KINDS", "SpaceError", "spaces_dir", "list_spaces", "resolve_space"]

log = logging.getLogger(__name__)

_FIELDS = ("name", "description", "branches")


class SpaceError(ValueError):
    """A user mistake about operation spaces: unknown space or branch type, malformed space file.
    The message is one line naming what is wrong and what is allowed."""


def spaces_dir() -> Path:
    """The folder holding the space files: ``$REPSEARCH_SPACES`` or ``<project root>/spaces``."""
    env = os.environ.get("REPSEARCH_SPACES")
    if env:
        return Path(env).expanduser().resolve()
    return Path(__file__).resolve().parent.parent / "spaces"


def _check_kinds(kinds: object, where: str = "") -> tuple[str, ...]:
    prefix = f"{where}: " if where else ""
    if isinstance(kinds, (str, bytes)) or not isinstance(kinds, (list, tuple)):
        raise SpaceError(f"{prefix}branches must be a list of branch types, got {kinds!r}")
    for k in kinds:
        if not isinstance(k, str) or k not in BRANCH_KINDS:
            raise SpaceError(f"{prefix}unknown branch type '{k}' is not one of {', '.join(BRANCH_KINDS)}")
    wanted = set(kinds) | {"kxk"}
    return tuple(k for k in BRANCH_KINDS if k in wanted)


def _load_file(path: Path) -> tuple[str, str, tuple[str, ...]]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        msg = str(exc).replace("\n", " ")
        raise SpaceError(f"{path}: cannot read space file: {msg}") from None
    if not isinstance(data, dict):
        raise SpaceError(f"{path}: a space file is a mapping with fields {', '.join(_FIELDS)}")
    extra = sorted(set(map(str, data)) - set(_FIELDS))
    if extra:
        raise SpaceError(f"{path}: unknown field '{extra[0]}'; allowed: {', '.join(_FIELDS)}")
    missing = [f for f in _FIELDS if f not in data]
    if missing:
        raise SpaceError(f"{path}: missing field '{missing[0]}'")
    name = data["name"]
    if name != path.stem:
        raise SpaceError(f"{path}: name '{name}' does not match the file name '{path.stem}'")
    desc = data["description"]
    if not isinstance(desc, str):
        raise SpaceError(f"{path}: description must be a string")
    return name, desc, _check_kinds(data["branches"], str(path))


def list_spaces() -> dict[str, tuple[str, tuple[str, ...]]]:
    """``{name: (description, branches)}`` for every ``*.yaml`` in :func:`spaces_dir`, sorted by
    name; ``branches`` in canonical order with ``kxk`` included.

    Raises:
        SpaceError: for a malformed space file (naming the file).
    """
    root = spaces_dir()
    out: dict[str, tuple[str, tuple[str, ...]]] = {}
    if not root.is_dir():
        log.warning("spaces folder %s does not exist", root)
        return out
    for path in sorted(root.glob("*.yaml")):
        name, desc, kinds = _load_file(path)
        out[name] = (desc, kinds)
    return out


def resolve_space(name_or_list: Union[str, list[str], tuple[str, ...]]) -> tuple[str, ...]:
    """The branch kinds of a space name or an inline list (DESIGN.md "Operation spaces").

    Args:
        name_or_list: a space name (``"dbb"``) or a list of branch types (``["kxk", "1x1"]``).

    Returns:
        kinds in canonical order (:data:`BRANCH_KINDS`), ``kxk`` always included.

    Raises:
        SpaceError: ``unknown space 'x'; available: acb, dbb, dyrep, repvgg`` or
            ``unknown branch type 'x' is not one of kxk, 1x1, ...``.
    """
    if isinstance(name_or_list, str):
        spaces = list_spaces()
        if name_or_list not in spaces:
            raise SpaceError(f"unknown space '{name_or_list}'; available: {', '.join(spaces) or '(none)'}")
        return spaces[name_or_list][1]
    return _check_kinds(name_or_list)
