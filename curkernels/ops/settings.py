"""The ops layer's environment knobs, read once into a frozen `Settings` (`reload` reads again).

Reading the environment on every call costs host time on the eager decode path and lets a
decision change between two calls of one layer; so every knob is read here, once, at import.
`reload()` reads them again and makes the modules that memoize decisions forget them: tests call
it after changing a variable, and so may a program that sets one after importing curkernels.
"""

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ENV_BACKEND = "CURKERNELS_BACKEND"
ENV_DECODE_TABLE = "CURKERNELS_DECODE_TABLE"
ENV_GROUP_TABLE = "CURKERNELS_GROUP_TABLE"
ENV_DECODE_CONFIGS = "CURKERNELS_DECODE_CONFIGS"
ENV_SINGLE_LAUNCH = "CURKERNELS_TRITON_SINGLE_LAUNCH"
ENV_AUTOTUNE = "CURKERNELS_TRITON_AUTOTUNE"
ENV_CACHE_DIR = "CURKERNELS_CACHE_DIR"
ENV_TRITON_INTERPRET = "TRITON_INTERPRET"


@dataclass(frozen=True)
class Settings:
    """What the environment asks of the ops layer.

    backend: CURKERNELS_BACKEND as set ('auto' when unset or empty; dispatch validates it when
        a call first reads it, so that a bad value is an error naming the variable, not an
        import failure).
    decode_table, group_table, decode_configs: a measured table a user names for their GPU
        (CURKERNELS_DECODE_TABLE, CURKERNELS_GROUP_TABLE, CURKERNELS_DECODE_CONFIGS), or None.
    triton_interpret: TRITON_INTERPRET=1, Triton's interpreter on CPU tensors.
    single_launch: the persistent single-launch decode kernels on a GPU
        (CURKERNELS_TRITON_SINGLE_LAUNCH=0 runs the barrier-free form, one launch a phase).
    autotune: tune the prefill kernel's config (CURKERNELS_TRITON_AUTOTUNE=0: the default).
    cache_dir: where tuned prefill configs are kept (CURKERNELS_CACHE_DIR).
    """
    backend: str
    decode_table: str | None
    group_table: str | None
    decode_configs: str | None
    triton_interpret: bool
    single_launch: bool
    autotune: bool
    cache_dir: Path

    @classmethod
    def from_environment(cls) -> "Settings":
        environ = os.environ
        return cls(backend=environ.get(ENV_BACKEND) or "auto",
                   decode_table=environ.get(ENV_DECODE_TABLE) or None,
                   group_table=environ.get(ENV_GROUP_TABLE) or None,
                   decode_configs=environ.get(ENV_DECODE_CONFIGS) or None,
                   triton_interpret=environ.get(ENV_TRITON_INTERPRET) == "1",
                   single_launch=environ.get(ENV_SINGLE_LAUNCH, "1") != "0",
                   autotune=environ.get(ENV_AUTOTUNE) != "0",
                   cache_dir=Path(environ.get(ENV_CACHE_DIR)
                                  or Path.home() / ".cache" / "curkernels"))


current = Settings.from_environment()
_forgetters: list[Callable[[], None]] = []


def on_reload(forget: Callable[[], None]) -> Callable[[], None]:
    """Registers `forget`, which drops what a module memoized from the settings; returns it."""
    _forgetters.append(forget)
    return forget


def reload() -> Settings:
    """Reads the environment again into `current`, and forgets every memoized decision."""
    global current
    current = Settings.from_environment()
    for forget in _forgetters:
        forget()
    return current
