"""Transparent huge pages for the large buffers XLA:CPU allocates afresh every step (docs/design.md, "Huge pages").

glibc's malloc asks the kernel for 2 MB pages when GLIBC_TUNABLES holds glibc.malloc.hugetlb=1 (glibc >= 2.35), and
reads its tunables only when a process starts: train.py and sample.py re-execute themselves with the setting before
importing jax.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

TUNABLE = "glibc.malloc.hugetlb"
THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def _glibc_version() -> tuple[int, ...] | None:
    try:
        name, version = os.confstr("CS_GNU_LIBC_VERSION").split()
    except (AttributeError, ValueError, OSError):  # not Linux, or not glibc (musl has no such name)
        return None
    return tuple(int(part) for part in version.split(".")[:2]) if name == "glibc" else None


def huge_pages_env(env) -> dict | None:
    """env with glibc's malloc asking for transparent huge pages; None where that cannot work (not glibc >= 2.35,
    the kernel's THP off) or GLIBC_TUNABLES already sets glibc.malloc.hugetlb (the user's choice, or our re-exec)."""
    version = _glibc_version()
    if version is None or version < (2, 35) or TUNABLE in env.get("GLIBC_TUNABLES", ""):
        return None
    if not THP_MODE.exists() or "[never]" in THP_MODE.read_text():
        return None
    tunables = ":".join(filter(None, [env.get("GLIBC_TUNABLES"), f"{TUNABLE}=1"]))
    return dict(env, GLIBC_TUNABLES=tunables)


def reexec_with_huge_pages() -> None:
    """Replace this process (same pid, arguments and open files) by itself with huge pages on, where they can be."""
    env = huge_pages_env(os.environ)
    if env is not None:
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, sys.orig_argv, env)
