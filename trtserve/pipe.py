"""``trtserve.pipe(config)``: a model pipeline in-process, thread-safe, as TorchPipe's tp.pipe."""
from __future__ import annotations

import _thread
from pathlib import Path
from typing import Any

from .config import load_config
from .errors import TrtserveError
from .hold import held_dispatch
from .modelcode import ModelCode, load_model_code
from .pipeline import Pipeline
from .warmup import run_warmup
from .repository import latest_version_dir


class Pipe:
    """Callable pipeline: ``models(item)`` or ``models([items])`` fills ``result`` in place.

    ``result`` is absent on an item that failed softly; errors are raised to the caller
    (for a list, after every item has finished, the first error in list order).
    """

    def __init__(self, pipeline: Pipeline, code: ModelCode | None = None) -> None:
        self.pipeline = pipeline
        self._code = code  # the folder's backend.py, released with the pipe

    def __call__(self, items: dict[str, Any] | list[dict[str, Any]]) -> None:
        batch = [items] if isinstance(items, dict) else list(items)
        errors: list[TrtserveError | None] = [None] * len(batch)
        remaining = [len(batch)]
        # A bare lock is the cheapest cross-thread wake-up in CPython (an Event adds a
        # Condition and a waiter lock): held now, released by the last item to finish.
        finished = _thread.allocate_lock()
        finished.acquire()
        count_lock = _thread.allocate_lock()

        def on_done_for(index: int):
            def on_done(_item, error):
                errors[index] = error
                with count_lock:
                    remaining[0] -= 1
                    last = remaining[0] == 0
                if last:
                    finished.release()

            return on_done

        with held_dispatch():  # a list's items form batches on inline nodes too
            for index, item in enumerate(batch):
                try:
                    self.pipeline.submit(item, on_done_for(index))
                except TrtserveError as exc:
                    on_done_for(index)(item, exc)
        if batch:
            finished.acquire()
        first = next((e for e in errors if e is not None), None)
        if first is not None:
            raise first

    def close(self) -> None:
        self.pipeline.close()
        if self._code is not None:
            self._code.release()

    def __enter__(self) -> Pipe:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def pipe(config: dict[str, Any] | str | Path, **kwargs: Any) -> Pipe:
    """Build and start a pipeline from a config dict or a ``config.toml`` path.

    For a path inside a model repository folder, ``backend.py`` beside it is loaded first
    and ``model`` files resolve against the latest numbered version folder.
    """
    model_dir, code = None, ModelCode("pipe")
    if isinstance(config, (str, Path)):
        folder = Path(config).parent
        code = load_model_code(folder.name, folder)  # its backends are this pipe's alone
        model_dir = latest_version_dir(folder) or folder
    try:
        with code.scope():
            model_config = load_config(config, model_dir=model_dir)
            pipeline = Pipeline(model_config, kwargs).start()
    except BaseException:
        code.release()
        raise
    try:
        run_warmup(pipeline, model_config.warmup, model_config.name)  # as the server does before READY
    except BaseException:
        pipeline.close()
        code.release()
        raise
    return Pipe(pipeline, code)
