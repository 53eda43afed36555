"""Path containment: input data is read only from inside the project or a configured data root.

* ``data.source`` (and ``preferences.extra_pairs_file``) must resolve -- after ``..`` and symlinks --
  inside one of :func:`data_roots`: the project root (the repository holding the ``asft`` package),
  the shared dataset directory ``../shared/data`` next to it when it exists, and every directory
  listed in the environment variable ``ASFT_DATA_ROOTS`` (``os.pathsep``-separated).
* Files named inside a data spec (``data.interactions_file``, ``data.items_file``) are relative to
  the data directory and must resolve inside it: absolute paths, ``..`` escapes and symlinks that
  point outside are refused.
* A path a person types as ``--data PATH`` on the command line is theirs: :func:`allow_typed_path`
  adds it to the roots of that process and its children (stage processes, cluster workers it starts).
  Containment keeps guarding every path that arrives another way: config files, ``key=value``
  overrides, deployment and flow parameters.

The functions raise :class:`PathContainmentError` (a ``ValueError``, so pydantic reports it under the
offending key); the loaders turn it into a :class:`~asft.data.schema.DataFormatError`. No pandas here:
:mod:`asft.config` imports this module.
"""

from __future__ import annotations

import os
from pathlib import Path

ROOTS_ENV = "ASFT_DATA_ROOTS"

__all__ = ["ROOTS_ENV", "PathContainmentError", "allow_typed_path", "data_roots", "inside", "project_root",
           "require_data_root", "resolve_inside"]


class PathContainmentError(ValueError):
    """A configured path escapes the directory it must stay in. The message names the key and the path."""

    def __init__(self, key: str, path: str | Path, problem: str):
        self.key = key
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{key}: {str(path)!r} {problem}")


def project_root() -> Path:
    """The repository that holds the ``asft`` package."""
    return Path(__file__).resolve().parents[2]


def _resolve(p: Path, key: str) -> Path:
    try:
        return p.resolve()
    except (OSError, RuntimeError, ValueError) as e:  # symlink loop, name too long, NUL byte
        raise PathContainmentError(key, p, f"cannot be resolved: {e}") from None


def data_roots() -> list[Path]:
    """Directories data may be read from (resolved; the environment is read on every call)."""
    root = project_root()
    roots = [root]
    shared = root.parent / "shared" / "data"
    if shared.is_dir():
        roots.append(shared.resolve())
    for part in os.environ.get(ROOTS_ENV, "").split(os.pathsep):
        if part.strip():
            try:
                roots.append(Path(part.strip()).expanduser().resolve())
            except (OSError, RuntimeError, ValueError):
                continue  # an unusable entry allows nothing
    return list(dict.fromkeys(roots))


def inside(path: Path, root: Path) -> bool:
    """Whether the resolved ``path`` is ``root`` or below it (both already resolved)."""
    return path == root or path.is_relative_to(root)


def allow_typed_path(path: str | Path) -> Path | None:
    """Allow reading ``path``, typed by a person as ``--data PATH``: its resolved form joins
    ``ASFT_DATA_ROOTS`` in this process's environment (inherited by the stage processes it starts).

    Returns the resolved path (``None`` for ``simulator`` or a path that cannot be resolved, which
    then fails containment with the usual message). Only the command-line entry points call this.
    """
    if not str(path).strip() or str(path) == "simulator":
        return None
    try:
        real = Path(path).expanduser().resolve()
    except (OSError, RuntimeError, ValueError):
        return None
    current = [p for p in os.environ.get(ROOTS_ENV, "").split(os.pathsep) if p.strip()]
    if str(real) not in current:
        os.environ[ROOTS_ENV] = os.pathsep.join([*current, str(real)])
    return real


def require_data_root(path: str | Path, key: str) -> Path:
    """The resolved ``path``; refuses one outside every data root."""
    p = Path(path)
    if not str(path).strip():
        raise PathContainmentError(key, path, "is empty")
    real = _resolve(p, key)
    roots = data_roots()
    if not any(inside(real, r) for r in roots):
        shown = ", ".join(str(r) for r in roots)
        raise PathContainmentError(
            key, path, f"resolves to {real}, outside the allowed data roots [{shown}]; add its directory to the"
            f" {ROOTS_ENV} environment variable ({os.pathsep!r}-separated) to allow it")
    return real


def resolve_inside(base: str | Path, rel: str | Path, key: str, base_key: str = "data.source") -> Path:
    """``base / rel`` resolved; refuses an absolute ``rel`` or one that resolves outside ``base``."""
    r = Path(rel)
    if not str(rel).strip():
        raise PathContainmentError(key, rel, "is empty")
    if r.is_absolute() or r.anchor:
        raise PathContainmentError(key, rel, f"is absolute; it must be a path relative to {base_key}")
    real_base = _resolve(Path(base), base_key)
    real = _resolve(real_base / r, key)
    if not inside(real, real_base):
        how = "a '..' escape" if ".." in r.parts else "a symlink pointing outside"
        raise PathContainmentError(key, rel, f"resolves to {real}, outside {base_key} ({real_base}): {how}")
    return real
