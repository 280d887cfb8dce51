"""Model control modes (Triton's ``--model-control-mode``): who may change what is served.

* ``none``: every model loads at start; the repository is not watched; ``load`` and
  ``unload`` are refused with PERMISSION_DENIED.
* ``poll``: every model loads at start; the repository is rescanned every
  ``poll_interval_s`` (added models load, changed ones reload after warmup, removed ones
  unload); ``load``/``unload`` are refused unless ``allow_model_control`` is also given.
* ``explicit``: only the models named by ``load_models`` load at start (``"*"`` = all of
  them, none by default); afterwards ``load`` and ``unload`` are the only way to change
  what is served.

Each option belongs to one mode: ``poll_interval_s`` to poll, ``load_models`` to explicit,
``allow_model_control`` to poll (explicit allows the operations anyway); elsewhere it is a
ConfigError that names the mode to choose.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from concurrent.futures import Executor
from dataclasses import dataclass

from ..errors import ConfigError, PermissionDeniedError
from ..repository import ModelRepository

log = logging.getLogger("trtserve.server")

MODES = ("none", "poll", "explicit")
DEFAULT_POLL_INTERVAL_S = 15.0  # Triton's --repository-poll-secs
ALL_MODELS = "*"


@dataclass(frozen=True)
class ModelControl:
    mode: str
    operations: bool  # whether clients may load and unload
    poll_interval_s: float | None
    load_models: tuple[str, ...]  # explicit mode: what loads at start ("*" = every model)

    @classmethod
    def resolve(
        cls,
        mode: str | None,
        allow_model_control: bool = False,
        poll_interval_s: float | None = None,
        load_models: Iterable[str] | None = None,
    ) -> ModelControl:
        """The effective mode from the Server/CLI options (``mode`` None: ``none``, the
        default); contradictions are ConfigErrors."""
        mode = "none" if mode is None else mode
        if mode not in MODES:
            raise ConfigError(f"model_control must be one of {list(MODES)}, got {mode!r}", key="model_control", value=repr(mode))
        if mode == "none" and allow_model_control:
            raise ConfigError(
                "--allow-model-control contradicts --model-control none; to let clients load and unload models "
                "use --model-control explicit (add --load-model '*' to load every model at start) or "
                "--model-control poll --allow-model-control",
                key="model_control",
            )
        return cls(mode, mode == "explicit" or bool(allow_model_control), _interval(mode, poll_interval_s), _names(mode, load_models))

    def denial(self, op: str) -> PermissionDeniedError:
        how = "--model-control explicit"
        if self.mode == "poll":
            how = "--allow-model-control beside --model-control poll"
        return PermissionDeniedError(
            f"operation {op!r} is disabled: this server runs with --model-control {self.mode}; start it "
            f"with {how} to let clients load and unload models",
            operation=op,
        )

    def startup_models(self, repository: ModelRepository) -> list[str] | None:
        """What the mode loads at start (None: every model).  An unknown ``--load-model``
        name is an operator's typo: refused before the server binds."""
        if self.mode != "explicit" or ALL_MODELS in self.load_models:
            return None
        on_disk = repository.scan()
        unknown = [name for name in self.load_models if name not in on_disk]
        if unknown:  # an operator's typo: refuse to start rather than serve without the model
            raise ConfigError(
                f"--load-model {unknown[0]!r}: no such model in {repository.root} (models there: {on_disk}); "
                "name a folder holding a config.toml",
                key="load_model",
                value=unknown[0],
            )
        return list(self.load_models)


def _interval(mode: str, poll_interval_s: float | None) -> float | None:
    if mode != "poll":
        if poll_interval_s is not None:
            raise ConfigError(
                f"poll_interval_s={poll_interval_s!r} applies only to --model-control poll (the mode is {mode!r}); "
                "drop --poll-interval or use --model-control poll",
                key="poll_interval_s",
            )
        return None
    if poll_interval_s is None:
        return DEFAULT_POLL_INTERVAL_S
    if not poll_interval_s > 0:
        raise ConfigError(f"poll_interval_s (--poll-interval) must be > 0 seconds, got {poll_interval_s!r}", key="poll_interval_s")
    return float(poll_interval_s)


def _names(mode: str, load_models: Iterable[str] | None) -> tuple[str, ...]:
    names = tuple(load_models or ())
    if names and mode != "explicit":
        raise ConfigError(
            f"--load-model {names[0]!r} applies only to --model-control explicit; in {mode!r} mode every model loads at start",
            key="load_model",
        )
    if ALL_MODELS in names and len(names) > 1:
        raise ConfigError("--load-model '*' loads every model: give it alone, not with other names", key="load_model")
    bad = [n for n in names if type(n) is not str or not n]
    if bad:
        raise ConfigError(f"--load-model takes model names, got {bad[0]!r}", key="load_model", value=repr(bad[0]))
    return names


async def poll_forever(repository: ModelRepository, executor: Executor, interval_s: float) -> None:
    """Poll mode: rescan the repository in the executor (never on the loop) every interval."""
    loop = asyncio.get_running_loop()
    while True:
        await asyncio.sleep(interval_s)
        try:
            changes = await loop.run_in_executor(executor, repository.poll)
        except Exception:  # a poll that breaks must not end polling (or the server)
            log.exception("repository poll failed")
            continue
        if any(changes.values()):
            log.info("repository poll: %s", {k: v for k, v in changes.items() if v})
