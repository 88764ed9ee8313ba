"""--key=value flags of the bench scripts, typed by their defaults."""


def parse_flags(argv: list[str], defaults: dict) -> dict:
    """The defaults with each --key=value of argv applied; an unknown key or a bare word is an error naming it."""
    flags = dict(defaults)
    for arg in argv:
        key, eq, value = arg.removeprefix("--").partition("=")
        if not arg.startswith("--") or not eq or key not in flags:
            raise SystemExit(f"bad flag {arg!r}; known: {', '.join('--' + k + '=...' for k in defaults)}")
        kind = type(defaults[key])
        try:
            flags[key] = kind(value)
        except ValueError:
            raise SystemExit(f"--{key} takes {kind.__name__}; got {value!r}") from None
    return flags
