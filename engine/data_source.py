"""The data-source protocol: all the engine knows about the batches it trains on (see docs/engine.md).

A data source is one rank's stream of micro-batches. The batches hold only what the task module reads; what
the source counts about them (skipped samples, samples per stream) it declares by name and reports through
:meth:`DataSource.counters`, never inside a batch.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class DataSource(Protocol):
    """One rank's micro-batches, resumable, with declared cumulative counters.

    ``counter_names`` is fixed when the source is built and the same on every rank; the engine logs counter
    ``name`` as the TensorBoard tag ``data/<name>`` (its value summed over ranks) and saves
    :meth:`counters` beside the source's state in each rank's checkpoint file.
    """

    counter_names: tuple[str, ...]

    def __iter__(self) -> Iterator[Any]:
        """Micro-batches from the position of the last one handed out, endless or one epoch (the engine
        iterates again when a pass ends)."""
        ...

    def state_dict(self) -> dict:
        """Everything needed to continue after the batches handed out so far (not those prefetched),
        counters included."""
        ...

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly from ``state``, taken from the same rank of a run of the same world size."""
        ...

    def start_at(self, micro_batches: int) -> None:
        """Continue as after ``micro_batches`` micro-batches of this rank when no state can be mapped (a
        resume on another world size): without replaying the first batches; counters may restart."""
        ...

    def counters(self) -> dict[str, float]:
        """Cumulative values over the batches handed out, for exactly the names in ``counter_names``."""
        ...


REQUIRED_METHODS = ("__iter__", "state_dict", "load_state_dict", "start_at", "counters")
# Optional: ``close()``, called by the trainer when training ends (finished, stopped or failed): a source with
# worker processes that outlive an iteration (persistent loader workers) ends them there. See :func:`close`.


def close(data: Any) -> None:
    """Call ``data.close()`` where the source has one (its worker processes end now, not at exit)."""
    closer = getattr(data, "close", None)
    if callable(closer):
        closer()


def check_data_source(data: Any) -> None:
    """Raise TypeError naming what is missing if ``data`` does not follow the protocol."""
    missing = [name for name in REQUIRED_METHODS if not callable(getattr(data, name, None))]
    names = getattr(data, "counter_names", None)
    if not isinstance(names, tuple) or not all(isinstance(n, str) for n in names):
        missing.append("counter_names (a tuple of str)")
    if missing:
        raise TypeError(
            f"data source {type(data).__name__} lacks {', '.join(missing)} (see beit3.engine.data_source)"
        )
    counter_values(data)


def counter_values(data: DataSource) -> dict[str, float]:
    """``data.counters()`` as floats, checked to name exactly ``data.counter_names``."""
    values, declared = data.counters(), set(data.counter_names)
    if set(values) != declared:
        extra, absent = sorted(set(values) - declared), sorted(declared - set(values))
        raise TypeError(
            f"data source {type(data).__name__}: counters() must return exactly counter_names "
            f"(undeclared: {extra}, not returned: {absent})"
        )
    return {name: float(values[name]) for name in data.counter_names}
