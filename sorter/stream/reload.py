"""Hot reload: a new checkpoint at the ``--checkpoint`` path is loaded, verified and warmed up in the
background, then served from the next batch on. No restart, no rebalance, no batch decided by two models.

The path is watched by polling its ``stat`` (every ``model.reload_poll_s``): a Kubernetes volume update
(a ConfigMap or projected volume swaps a symlink) or a model job's atomic rename (``save_checkpoint``
writes a temp file and renames it) both change what the path resolves to. A change starts one load on a
helper thread: read and verify the checkpoint (digests), build the model as start-up does (device,
precision, int8, compile), check it against what serves (the same input size; the routing table's routes
name its labels or SKUs: with ``--strict-routes`` a miss refuses it), then one warm-up batch. A file that
fails any of it is refused (``model.reload_refused`` with the reason, ``sorter_model_reloads_total
{result="refused"}``) and the old model keeps serving; the same file is not tried again until it changes.
A file caught half-written fails its digest and is tried again when the writer is done (its stat changes).

The worker takes the loaded model between batches (:meth:`Reloader.take`) and hands it to the batch it
submits next, so every batch before it ran on the old model and every batch from it on the new one.
"""

from __future__ import annotations

import contextvars
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sorter.errors import SorterError
from sorter.logs import get_logger

log = get_logger("sorter.reload")


@dataclass(frozen=True)
class Loaded:
    model: object  # a Classifier, ready: verified and warmed up
    path: Path
    load_s: float


def signature(path: Path) -> tuple | None:
    try:
        st = os.stat(path)  # follows symlinks: a volume's ..data swap changes the target
    except OSError:
        return None
    return (st.st_ino, st.st_dev, st.st_size, st.st_mtime_ns)


class Reloader:
    """``load(path)`` builds a model from a checkpoint (raising :class:`SorterError` with what is wrong);
    ``check(model)`` raises :class:`SorterError` if it may not replace the one serving."""

    def __init__(
        self,
        path: Path,
        load: Callable[[Path], object],
        check: Callable[[object], None],
        *,
        poll_s: float = 2.0,
        on_refused: Callable[[str], None] | None = None,
        serving: tuple | None = None,
        watch: bool = True,
    ) -> None:
        """``serving``: :func:`signature` of the file taken before start-up read it (a file replaced while the
        worker started is then loaded at the first poll); default: the file now."""
        self.path, self.load, self.check, self.poll_s = path, load, check, poll_s
        self.on_refused = on_refused
        self._seen = serving if serving is not None else signature(path)  # what serves now was built from this
        self._polled = time.monotonic()
        self.watch = watch  # False: only what the control topic asks for (control.py)
        self._loading: threading.Thread | None = None
        self._ready: Loaded | None = None
        self._requested: tuple[Path, str | None] | None = None  # from the control topic, not started yet
        self._generation = 0  # bumped by each request: a load started before it is never served
        self._asked: tuple[Path, str | None] | None = None  # the request loading or loaded, not yet taken
        self._lock = threading.Lock()

    def request(self, path: Path, version: str | None) -> bool:
        """Load ``path`` (the control topic's ``load``), served only if its model is ``version`` (when given).
        It supersedes every earlier request and load: one not started is replaced, one loading or loaded but
        not taken yet is dropped when done (the newest request is what serves, a rollback included). The same
        request again while it is asked for, loading or loaded (a publisher's retry) changes nothing: False."""
        with self._lock:
            if (path, version) in (self._requested, self._asked):
                return False
        self.cancel()
        self._requested = (path, version)
        return True

    def cancel(self) -> None:
        """Drop every load asked for or under way (a rollback to the model serving: nothing to load)."""
        with self._lock:
            self._generation += 1
            self._requested, self._ready, self._asked = None, None, None

    def poll(self) -> None:
        """Cheap; call it from the loop as often as convenient: a stat every ``poll_s``, a load on a change
        (or on a request from the control topic)."""
        now = time.monotonic()
        if self._loading is not None and self._loading.is_alive():
            return
        if self._requested is not None:
            with self._lock:
                (path, version), self._requested = self._requested, None
                self._asked = (path, version)
            self._start(None, path, version)
            return
        if not self.watch or now - self._polled < self.poll_s:
            return
        self._polled = now
        now_file = signature(self.path)
        if now_file is None or now_file == self._seen:
            return  # gone for a moment (a rename in progress), or unchanged
        self._seen = now_file
        self._start(now_file, self.path, None)

    def _start(self, watched: tuple | None, path: Path, version: str | None) -> None:
        context = contextvars.copy_context()  # its lines carry the worker's id, as every line does
        self._loading = threading.Thread(
            target=context.run,
            args=(self._load, watched, path, version, self._generation),
            name="reload",
            daemon=True,
        )
        self._loading.start()

    def _load(self, watched: tuple | None, path: Path, version: str | None, generation: int) -> None:
        """``watched``: the stat of the watched path that started it (None: a control-topic request)."""
        started = time.perf_counter()
        log.info("model.reload_started", path=str(path), asked_version=version)
        try:
            model = self.load(path)
            if version is not None and model.model_version != version:
                raise SorterError(f"the control message asked for model {version}; {path} holds {model.model_version}")
            self.check(model)
            model.predict([np.zeros((model.input_size, model.input_size, 3), np.uint8)])  # warm-up
        except SorterError as exc:
            self._refuse(path, str(exc), generation)
            return
        except Exception as exc:  # a surprise from torch/OpenVINO on a bad file: refused, never a crash
            self._refuse(path, f"{type(exc).__name__}: {exc}", generation)
            return
        if watched is not None and signature(self.path) != watched:  # replaced again meanwhile: load that one
            self._seen = None
            return
        with self._lock:
            if generation != self._generation:
                log.info("model.reload_superseded", path=str(path), version=model.model_version)
                return
            self._ready = Loaded(model, path, time.perf_counter() - started)

    def _refuse(self, path: Path, why: str, generation: int) -> None:
        with self._lock:
            if generation != self._generation:  # nobody wants it any more (a rollback while it loaded)
                log.info("model.reload_superseded", path=str(path), failed=why[:300])
                return
            if self._asked is not None and self._asked[0] == path:
                self._asked = None  # refused: asking for it again tries again
        log.error("model.reload_refused", path=str(path), error=why[:500], serving="the previous model")
        if self.on_refused is not None:
            self.on_refused(why)

    def take(self) -> Loaded | None:
        """The model loaded since the last call, if any (then it is the caller's to serve)."""
        with self._lock:
            ready, self._ready = self._ready, None
            if ready is not None:
                self._asked = None
        return ready
