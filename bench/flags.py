"""--key=value flags of the bench scripts, typed by their defaults, through the package's flag parser."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: gpt2_jax without installing

from gpt2_jax.config import FlagParser  # noqa: E402  (after the path above)


def parse_flags(argv: list[str], defaults: dict, description: str | None = None) -> dict:
    """The defaults with each --key=value of argv applied; an unknown flag or a bad value prints the usage and
    exits with status 2."""
    parser = FlagParser(prog=f"python bench/{Path(sys.argv[0]).name}", description=description)
    parser.add_defaults(defaults)
    return vars(parser.parse_args(argv))
