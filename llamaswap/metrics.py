"""Prometheus metrics (MET-1..MET-3) and the token parsers behind them.

:class:`Metrics` owns a :class:`Registry` of its own (never prometheus_client's global
``REGISTRY``, so tests stay independent) and every metric of MET-2, with its documented names, labels and
buckets. It learns what happens from three feeds, wired by the service:

* model events (:meth:`Metrics.observe`, an ``IModelObserver`` added to
  ``router.observers``) -> model state, queue depth, in-flight, swaps, stops by reason,
  evictions by reason, load durations and failed starts, each straight from the event's own
  data; with ``memory.budget`` set, ``MemoryChanged`` -> the budget, the memory in use and each
  model's need (these three gauges exist only once a budget is in force);
* finished requests (``WebContext.request_listeners``): one record per model-dispatched request
  -> requests, durations, TTFB, queue wait, tokens, tokens/s, stream errors;
* ``LogBroadcaster.on_dropped`` -> ``llamaswap_log_bytes_dropped_total``.

Token parsing (MET-3) never buffers a whole stream: :func:`response_parser` picks an
incremental :class:`SSEUsageParser` for ``text/event-stream`` (it looks only at ``data:``
lines that mention ``usage`` or ``timings``) or a bounded :class:`JSONUsageParser` for
``application/json`` (parsed once, at the end, up to 4 MiB); anything else gets no parser,
so relaying it costs nothing per chunk.

The series are our own (:class:`Counter`, :class:`Gauge`, :class:`Histogram`: plain numbers
updated on the reactor thread), exposed through prometheus_client's metric families and text
format. prometheus_client itself (about 1 MB resident with what it imports) is loaded at the
first scrape, not by a daemon nobody scrapes.

This module imports only the event classes of ``llamaswap.observe``.

Size (~510 lines): the metric table and the feeds that fill it are one unit; the token parsers
(from ``_usage_fields`` on) are the seam should it grow.
"""
from __future__ import annotations

import json
import math
from bisect import bisect_left
from typing import Any, Iterable, Optional

#: the exposition format: 0.0.4, the text format Prometheus scrapes by default
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
from twisted.web.resource import Resource

from llamaswap.observe import (
    MemoryChanged, ModelEvent, QueueChanged, Reloaded, Removed, Replaced, StartFailed, Started, Starting,
    StateChanged, Stopping)

__all__ = [
    "CONTENT_TYPE", "Counter", "DURATION_BUCKETS", "EVICTION_REASONS", "Gauge", "Histogram", "JSONUsageParser",
    "LOAD_BUCKETS", "MAX_JSON_BYTES", "MAX_SSE_LINE", "Metrics", "MetricsPage", "Registry", "SSEUsageParser",
    "STATES", "STOP_REASONS", "TPS_BUCKETS", "exposition", "response_parser", "usage_from",
]

#: MET-2 buckets.
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
LOAD_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300)
TPS_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)
#: llama-swap's state strings (process.State values).
STATES = ("stopped", "starting", "ready", "stopping", "shutdown")
STOP_REASONS = ("swap", "ttl", "unload", "reload", "failed_start", "shutdown", "exited")
#: ``llamaswap_evictions_total`` reasons: a swap's eviction reason (``Stopping.cause``), or the
#: stop's own reason for ttl, unload and reload.
EVICTION_REASONS = ("memory", "group", "matrix", "profile", "ttl", "unload", "reload")
TOKEN_TYPES = ("input", "output", "cached")
LOG_SOURCES = ("proxy", "upstream", "combined")
#: MET-3 limits.
MAX_SSE_LINE = 1024 * 1024
MAX_JSON_BYTES = 4 * 1024 * 1024


class Metrics:
    """Every MET-2 metric on one registry, and the feeds that update them.

    :param registry: the registry to register on: a fresh :class:`Registry` by default (a
        prometheus_client ``CollectorRegistry`` works too).
    :param models: model ids that get their zero series at once (MET-1).
    :param key_names: the names of the API keys when ``apiKeys`` has an entry in mapping form:
        the request and token counters then carry a ``key`` label (the key's name, never the
        key); None (no scoped keys) keeps their labels unchanged.
    """

    def __init__(self, models: Iterable[str] = (), registry: Optional[Any] = None,
                 key_names: Optional[Iterable[str]] = None) -> None:
        self.registry = registry if registry is not None else Registry()
        r = self.registry
        self._key_names: Optional[tuple[str, ...]] = tuple(key_names) if key_names is not None else None
        self.requests, self.tokens = self._keyed_counters()
        self.request_duration = Histogram(
            "llamaswap_request_duration_seconds", "From receipt to the last byte sent.",
            ["model", "endpoint"], r, DURATION_BUCKETS)
        self.ttfb = Histogram(
            "llamaswap_time_to_first_byte_seconds",
            "From receipt to the first body byte sent (queueing and loading included).",
            ["model", "endpoint"], r, DURATION_BUCKETS)
        self.queue_wait = Histogram("llamaswap_queue_wait_seconds", "From admission to grant.",
                                    ["model"], r, DURATION_BUCKETS)
        self.load_duration = Histogram(
            "llamaswap_model_load_duration_seconds", "From spawn to ready, or to failure.",
            ["model", "outcome"], r, LOAD_BUCKETS)
        self.swaps = Counter("llamaswap_swaps_total", "Starts that evicted at least one other model.",
                             ["model"], r)
        self.stops = Counter("llamaswap_model_stops_total", "Model stops, by cause.", ["model", "reason"], r)
        self.queue_depth = Gauge("llamaswap_queue_depth", "Waiting requests.", ["model"], r)
        self.inflight = Gauge("llamaswap_inflight_requests", "In-flight requests.", ["model"], r)
        self.model_state = Gauge("llamaswap_model_state", "1 for the model's current state, 0 for the others.",
                                 ["model", "state"], r)
        self.prompt_tps = Histogram("llamaswap_prompt_tokens_per_second",
                                    "llama.cpp timings.prompt_per_second.", ["model"], r, TPS_BUCKETS)
        self.generation_tps = Histogram("llamaswap_generation_tokens_per_second",
                                        "llama.cpp timings.predicted_per_second.", ["model"], r, TPS_BUCKETS)
        self.stream_errors = Counter("llamaswap_upstream_stream_errors_total",
                                     "Responses whose upstream connection was lost after the headers "
                                     "were relayed.", ["model"], r)
        self.config_reloads = Counter("llamaswap_config_reloads_total", "Config reloads.", ["result"], r)
        self.log_dropped = Counter("llamaswap_log_bytes_dropped_total",
                                   "Log bytes discarded for log stream readers too slow to keep up.",
                                   ["source"], r)
        self.evictions = Counter("llamaswap_evictions_total",
                                 "Running models stopped by the router, by reason: evicted for another "
                                 "model (memory, group, matrix, profile), or ttl, unload, reload.",
                                 ["model", "reason"], r)
        # keepCache (llamaswap.kvcache): series made at a model's first save or restore
        self.kv_saved_bytes = Counter("llamaswap_kv_saved_bytes_total",
                                      "Bytes of KV cache saved before planned stops (keepCache).", ["model"], r)
        self.kv_restored_tokens = Counter("llamaswap_kv_restored_tokens_total",
                                          "Tokens of KV cache restored at starts (keepCache).", ["model"], r)
        self.kv_save_duration = Histogram("llamaswap_kv_save_duration_seconds",
                                          "Time spent saving a model's KV cache before a planned stop.",
                                          ["model"], r, DURATION_BUCKETS)
        self.kv_restore_duration = Histogram("llamaswap_kv_restore_duration_seconds",
                                             "Time spent restoring a model's KV cache at a start "
                                             "(part of its load time).", ["model"], r, DURATION_BUCKETS)
        # memory.budget gauges: registered by the first MemoryChanged with a budget
        self.memory_budget: Optional[Gauge] = None
        self.memory_used: Optional[Gauge] = None
        self.model_memory: Optional[Gauge] = None
        self._memory_series: set[tuple[str, str]] = set()
        #: (metric, label values) -> its child, for the per-request feeds; emptied whenever a
        #: series is removed (a removed child would keep counting where nobody sees it)
        self._children: dict[tuple, Any] = {}
        #: model -> the (in flight, waiting) its gauges show: three queue events per request,
        #: each changing one or two of them
        self._queue_shown: dict[str, tuple[int, int]] = {}
        for result in ("success", "failure"):
            self.config_reloads.labels(result=result)
        for source in LOG_SOURCES:
            self.log_dropped.labels(source=source)
        self._models: set[str] = set()
        for model_id in models:
            self.add_model(model_id)

    # -- the model set (MET-1) ------------------------------------------------------------------

    def add_model(self, model_id: str) -> None:
        """Create ``model_id``'s series with zero values (state ``stopped``)."""
        if model_id in self._models:
            return
        self._models.add(model_id)
        self.queue_depth.labels(model=model_id).set(0)
        self.inflight.labels(model=model_id).set(0)
        self.set_state(model_id, "stopped")
        self.swaps.labels(model=model_id)
        self.stream_errors.labels(model=model_id)
        self.queue_wait.labels(model=model_id)
        self.prompt_tps.labels(model=model_id)
        self.generation_tps.labels(model=model_id)
        self._token_series(model_id)
        for reason in STOP_REASONS:
            self.stops.labels(model=model_id, reason=reason)
        for reason in EVICTION_REASONS:
            self.evictions.labels(model=model_id, reason=reason)
        for outcome in ("success", "failure"):
            self.load_duration.labels(model=model_id, outcome=outcome)

    def _child(self, metric: Any, *values: str) -> Any:
        """``metric.labels(*values)``, looked up once per label set."""
        key = (metric, values)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*values)
        return child

    def remove_model(self, model_id: str) -> None:
        """Forget every series of a model removed by a reload (bounded label sets)."""
        self._children.clear()
        self._queue_shown.pop(model_id, None)
        self._models.discard(model_id)
        for metric in (self.queue_depth, self.inflight, self.swaps, self.stream_errors,
                       self.queue_wait, self.prompt_tps, self.generation_tps):
            _remove(metric, model_id)
        for state in STATES:
            _remove(self.model_state, model_id, state)
        for reason in STOP_REASONS:
            _remove(self.stops, model_id, reason)
        for reason in EVICTION_REASONS:
            _remove(self.evictions, model_id, reason)
        for key in [k for k in self._memory_series if k[0] == model_id]:
            self._memory_series.discard(key)
            _remove(self.model_memory, *key)
        for outcome in ("success", "failure"):
            _remove(self.load_duration, model_id, outcome)
        for metric in (self.requests, self.tokens, self.request_duration, self.ttfb):
            for labels in [s for s in metric.label_sets() if s[0] == model_id]:
                _remove(metric, *labels)
        _remove(self.log_dropped, model_id)
        for metric in (self.kv_saved_bytes, self.kv_restored_tokens, self.kv_save_duration,
                       self.kv_restore_duration):
            _remove(metric, model_id)

    # -- the key label (scoped API keys) ----------------------------------------------------------

    def _keyed_counters(self) -> tuple["Counter", "Counter"]:
        """``llamaswap_requests_total`` and ``llamaswap_tokens_total``, with a ``key`` label when
        scoped keys are configured."""
        extra = ["key"] if self._key_names is not None else []
        requests = Counter("llamaswap_requests_total", "Finished model-dispatched requests.",
                                ["model", "endpoint", "status", *extra], self.registry)
        tokens = Counter("llamaswap_tokens_total", "Tokens parsed from responses.",
                              ["model", "type", *extra], self.registry)
        return requests, tokens

    def _token_series(self, model_id: str) -> None:
        """The zero series of a model's token counter (MET-1), one per key name when keyed."""
        for kind in TOKEN_TYPES:
            if self._key_names is None:
                self.tokens.labels(model=model_id, type=kind)
            else:
                for name in self._key_names:
                    self.tokens.labels(model=model_id, type=kind, key=name)

    def set_key_names(self, names: Optional[Iterable[str]]) -> None:
        """A reload changed ``apiKeys``: the scoped keys' names, or None without scoped keys.

        Turning the ``key`` label on or off starts both counters afresh (their label set
        changes; Prometheus reads that as a counter reset); otherwise the series of keys no
        longer configured are dropped, and new keys get their zero series.
        """
        new = tuple(names) if names is not None else None
        if new == self._key_names:
            return
        self._children.clear()
        if (new is None) != (self._key_names is None):
            self.registry.unregister(self.requests)
            self.registry.unregister(self.tokens)
            self._key_names = new
            self.requests, self.tokens = self._keyed_counters()
        else:
            gone = set(self._key_names or ()) - set(new or ())
            self._key_names = new
            for metric in (self.requests, self.tokens):
                for labels in [s for s in metric.label_sets() if s[-1] in gone]:
                    _remove(metric, *labels)
        for model_id in self._models:
            self._token_series(model_id)

    def set_state(self, model_id: str, state: str) -> None:
        for s in STATES:
            self.model_state.labels(model=model_id, state=s).set(1 if s == state else 0)

    # -- feeds ------------------------------------------------------------------------------------

    def observe(self, event: ModelEvent) -> None:
        """``IModelObserver``: add it to ``router.observers``; every value comes from the event."""
        if isinstance(event, QueueChanged):  # the per-request one first
            model = event.model
            if model in self._models:
                shown = self._queue_shown.get(model)
                if shown is None or shown[0] != event.inflight:
                    self._child(self.inflight, model).set(event.inflight)
                if shown is None or shown[1] != event.waiting:
                    self._child(self.queue_depth, model).set(event.waiting)
                self._queue_shown[model] = (event.inflight, event.waiting)
        elif isinstance(event, StateChanged):
            if event.model in self._models:
                self.set_state(event.model, event.new)
        elif isinstance(event, Stopping):
            if event.reason in STOP_REASONS:
                self.stops.labels(model=event.model, reason=event.reason).inc()
            reason = (event.cause or "group") if event.reason == "swap" else event.reason
            if reason in EVICTION_REASONS and event.model in self._models:
                self.evictions.labels(model=event.model, reason=reason).inc()
        elif isinstance(event, Starting):
            if event.evicted:
                self.swaps.labels(model=event.model).inc()
        elif isinstance(event, Started):
            if event.model in self._models:
                self.load_duration.labels(model=event.model, outcome="success").observe(event.seconds)
        elif isinstance(event, StartFailed):  # PROC-6/7
            if event.model in self._models:
                self.load_duration.labels(model=event.model, outcome="failure").observe(event.seconds)
                self.stops.labels(model=event.model, reason="failed_start").inc()
        elif isinstance(event, Reloaded):
            for model_id in event.added:
                self.add_model(model_id)
        elif isinstance(event, Removed):
            self.remove_model(event.model)
        elif isinstance(event, Replaced):
            if event.model in self._models:
                self.set_state(event.model, event.state)
        elif isinstance(event, MemoryChanged):
            self._memory(event)

    def _memory(self, event: MemoryChanged) -> None:
        """The memory gauges follow ``MemoryChanged``; a reload removing the budget removes them."""
        if event.budget is None:
            for gauge in (self.memory_budget, self.memory_used, self.model_memory):
                if gauge is not None:
                    self.registry.unregister(gauge)
            self.memory_budget = self.memory_used = self.model_memory = None
            self._memory_series = set()
            return
        if self.memory_budget is None:
            r = self.registry
            self.memory_budget = Gauge("llamaswap_memory_budget_bytes", "memory.budget.", (), r)
            self.memory_used = Gauge("llamaswap_memory_used_bytes",
                                     "The needs of the models starting, ready or stopping, summed.", (), r)
            self.model_memory = Gauge("llamaswap_model_memory_bytes",
                                      "A model's memory need, by where it comes from "
                                      "(declared, measured, estimated, unknown).",
                                      ["model", "source"], r)
        self.memory_budget.labels().set(event.budget)
        self.memory_used.labels().set(event.used)
        series = set()
        for model_id, need, source in event.needs:
            if model_id in self._models:
                series.add((model_id, source))
                self.model_memory.labels(model=model_id, source=source).set(need)
        for key in self._memory_series - series:
            _remove(self.model_memory, *key)
        self._memory_series = series

    def request_finished(self, record: Any) -> None:
        """One ``WebContext.request_listeners`` ``RequestRecord`` of a finished model-dispatched request."""
        model = record.model
        if model and model not in self._models:
            model = ""  # removed by a reload meanwhile: keep label sets bounded
        endpoint = record.endpoint
        # label values in the order the metrics declare them
        keyed = (str(getattr(record, "key", "")),) if self._key_names is not None else ()
        child = self._child
        child(self.requests, model, endpoint, str(record.status), *keyed).inc()
        duration = record.duration
        if duration is not None:
            child(self.request_duration, model, endpoint).observe(max(duration, 0.0))
        ttfb = record.ttfb
        if ttfb is not None:
            child(self.ttfb, model, endpoint).observe(max(ttfb, 0.0))
        if not model:
            return
        wait = record.queue_wait
        if wait is not None:
            child(self.queue_wait, model).observe(max(wait, 0.0))
        if record.stream_error:
            child(self.stream_errors, model).inc()
        usage = record.usage
        if usage:
            for kind in TOKEN_TYPES:
                n = usage.get(kind)
                if n is not None and n > 0:
                    child(self.tokens, model, kind, *keyed).inc(n)
            if usage.get("prompt_per_second") is not None:
                child(self.prompt_tps, model).observe(usage["prompt_per_second"])
            if usage.get("tokens_per_second") is not None:
                child(self.generation_tps, model).observe(usage["tokens_per_second"])

    def kv_saved(self, model_id: str, nbytes: int, seconds: float) -> None:
        """``KvCache.on_saved``: a save before a planned stop wrote ``nbytes``."""
        if model_id in self._models:
            self.kv_saved_bytes.labels(model=model_id).inc(max(nbytes, 0))
            self.kv_save_duration.labels(model=model_id).observe(max(seconds, 0.0))

    def kv_restored(self, model_id: str, tokens: int, seconds: float) -> None:
        """``KvCache.on_restored``: a start restored ``tokens``."""
        if model_id in self._models:
            self.kv_restored_tokens.labels(model=model_id).inc(max(tokens, 0))
            self.kv_restore_duration.labels(model=model_id).observe(max(seconds, 0.0))

    def log_bytes_dropped(self, source: str, nbytes: int) -> None:
        """``LogBroadcaster.on_dropped``."""
        self.log_dropped.labels(source=source).inc(nbytes)

    def reload(self, result: str) -> None:
        """Count a config reload: ``result`` is ``success`` or ``failure`` (RLD-*)."""
        if result in ("success", "failure"):
            self.config_reloads.labels(result=result).inc()

    def exposition(self) -> bytes:
        return exposition(self.registry)


def exposition(registry: Any) -> bytes:
    """The text format (0.0.4) of every metric of ``registry``; loads prometheus_client."""
    from prometheus_client import generate_latest
    return generate_latest(registry)


class Registry:
    """The collectors of one exposition, in registration order: what prometheus_client's
    ``generate_latest`` needs from a ``CollectorRegistry`` (``collect()``), without loading
    prometheus_client until something collects."""

    def __init__(self) -> None:
        self._collectors: list[Any] = []

    def register(self, collector: Any) -> None:
        if collector in self._collectors:
            raise ValueError(f"{collector!r} is already registered")
        self._collectors.append(collector)

    def unregister(self, collector: Any) -> None:
        self._collectors.remove(collector)

    def collect(self) -> Iterable[Any]:
        for collector in list(self._collectors):
            yield from collector.collect()

    def get_sample_value(self, name: str, labels: Optional[dict] = None) -> Optional[float]:
        """The value of one sample (``name`` and exactly ``labels``), or None: as
        ``CollectorRegistry.get_sample_value``."""
        labels = labels or {}
        for family in self.collect():
            for sample in family.samples:
                if sample.name == name and sample.labels == labels:
                    return sample.value
        return None


# -- the per-request series ----------------------------------------------------------------------

class _Family:
    """A counter, gauge or histogram, exposed exactly as prometheus_client's ``Counter``,
    ``Gauge`` and ``Histogram`` are (same names, samples, order and number format), without
    their per-update locking and bucket scan: every update happens on the reactor thread, and
    so does every scrape.

    The subset of the prometheus_client API ``Metrics`` uses: ``labels(*values)`` or
    ``labels(**values)`` (a series, made at first use; a family without labels has its one
    series, ``labels()``, from the start), ``remove(*values)``, ``label_sets()``.
    """

    def __init__(self, name: str, documentation: str, labelnames: Iterable[str], registry: Any) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self._series: dict[tuple[str, ...], Any] = {}
        if not self.labelnames:
            self._series[()] = self._new()
        registry.register(self)

    def labels(self, *values: Any, **named: Any) -> Any:
        if named:
            if values:
                raise ValueError("labels: values by position or by name, not both")
            values = tuple(named[n] for n in self.labelnames)
        if len(values) != len(self.labelnames):
            raise ValueError(f"{self.name}: {len(self.labelnames)} label values expected, got {len(values)}")
        key = tuple(str(v) for v in values)
        series = self._series.get(key)
        if series is None:
            series = self._series[key] = self._new()
        return series

    def remove(self, *values: Any) -> None:
        del self._series[tuple(str(v) for v in values)]

    def label_sets(self) -> list[tuple[str, ...]]:
        return list(self._series)

    def _new(self) -> Any:
        raise NotImplementedError

    def describe(self) -> list:
        return [self._family()]

    def _family(self) -> Any:
        raise NotImplementedError

    def collect(self) -> list:
        """The family with every series (one ``value`` each; histograms say more)."""
        family = self._family()
        for values, series in self._series.items():
            family.add_metric(values, series.value)
        return [family]


class _CounterSeries:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1) -> None:
        if amount < 0:
            raise ValueError("counters only go up")
        self.value += amount


class Counter(_Family):
    """``prometheus_client.Counter`` (``name`` ends in ``_total``)."""

    def _new(self) -> _CounterSeries:
        return _CounterSeries()

    def _family(self) -> Any:
        from prometheus_client.core import CounterMetricFamily
        return CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)


class _GaugeSeries:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def set(self, value: float) -> None:
        self.value = float(value)


class Gauge(_Family):
    """``prometheus_client.Gauge``, set to a value (the only update ``Metrics`` makes)."""

    def _new(self) -> _GaugeSeries:
        return _GaugeSeries()

    def _family(self) -> Any:
        from prometheus_client.core import GaugeMetricFamily
        return GaugeMetricFamily(self.name, self.documentation, labels=self.labelnames)


class _HistogramSeries:
    __slots__ = ("counts", "sum", "bounds")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * len(bounds)
        self.sum = 0.0

    def observe(self, amount: float) -> None:
        self.counts[bisect_left(self.bounds, amount)] += 1  # the first bound >= amount
        self.sum += amount


class Histogram(_Family):
    """``prometheus_client.Histogram``."""

    def __init__(self, name: str, documentation: str, labelnames: Iterable[str], registry: Any,
                 buckets: Iterable[float]) -> None:
        bounds = [float(b) for b in buckets]
        if bounds[-1] != math.inf:
            bounds.append(math.inf)
        self.bounds = tuple(bounds)
        self._le: Optional[tuple[str, ...]] = None  # the bounds as exposed, made at the first scrape
        super().__init__(name, documentation, labelnames, registry)

    def _new(self) -> _HistogramSeries:
        return _HistogramSeries(self.bounds)

    def _family(self) -> Any:
        from prometheus_client.core import HistogramMetricFamily
        return HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)

    def collect(self) -> list:
        family = self._family()
        if self._le is None:
            from prometheus_client.utils import floatToGoString
            self._le = tuple(floatToGoString(b) for b in self.bounds)
        for values, series in self._series.items():
            total, buckets = 0.0, []
            for le, n in zip(self._le, series.counts):
                total += n
                buckets.append((le, total))
            family.add_metric(values, buckets, series.sum)
        return [family]


def _remove(metric: Any, *labels: str) -> None:
    if metric is None:
        return
    try:
        metric.remove(*labels)
    except KeyError:
        pass


class MetricsPage(Resource):
    """EP-11 / MET-1: ``GET /metrics`` in the Prometheus text format."""

    isLeaf = True

    def __init__(self, registry: Any) -> None:
        super().__init__()
        self._registry = registry  # ours, not the global REGISTRY: tests stay independent

    def render_GET(self, request: Any) -> bytes:
        request.setHeader(b"content-type", CONTENT_TYPE.encode("ascii"))
        return exposition(self._registry)

    def render_HEAD(self, request: Any) -> bytes:
        return self.render_GET(request)


# -- token parsing (MET-3) -----------------------------------------------------------------------

def _int(value: Any) -> Optional[int]:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _num(value: Any) -> Optional[float]:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return None


def _usage_fields(usage: dict) -> dict:
    """input/output/cached of one ``usage`` object (OpenAI, Responses or Anthropic names)."""
    out = {}
    for key, names in (("input", ("prompt_tokens", "input_tokens")),
                       ("output", ("completion_tokens", "output_tokens"))):
        for name in names:
            n = _int(usage.get(name))
            if n is not None:
                out[key] = n
                break
    for holder, name in (("prompt_tokens_details", "cached_tokens"),
                         ("input_tokens_details", "cached_tokens"), (None, "cache_read_input_tokens")):
        src = usage.get(holder) if holder else usage
        n = _int(src.get(name)) if isinstance(src, dict) else None
        if n is not None:
            out["cached"] = n
            break
    return out


class _UsageAccumulator:
    """Usage and timings seen so far; later non-zero values replace earlier ones (MET-3)."""

    def __init__(self) -> None:
        self.usage: dict = {}
        self.timings: Optional[dict] = None

    def take(self, obj: Any) -> None:
        if not isinstance(obj, dict):
            return
        for holder in (obj, obj.get("response"), obj.get("message")):
            usage = holder.get("usage") if isinstance(holder, dict) else None
            if isinstance(usage, dict):
                for key, n in _usage_fields(usage).items():
                    if n or key not in self.usage:
                        self.usage[key] = n
        timings = obj.get("timings")
        if isinstance(timings, dict):
            self.timings = timings

    def result(self) -> Optional[dict]:
        """``{"input","output","cached","prompt_per_second","tokens_per_second"}`` or None."""
        if not self.usage and self.timings is None:
            return None
        out = {"input": self.usage.get("input"), "output": self.usage.get("output"),
               "cached": self.usage.get("cached"), "prompt_per_second": None, "tokens_per_second": None}
        t = self.timings
        if t is not None:  # llama.cpp timings take precedence
            for key, name in (("input", "prompt_n"), ("output", "predicted_n"), ("cached", "cache_n")):
                n = _int(t.get(name))
                if n is not None:
                    out[key] = n
            out["prompt_per_second"] = _num(t.get("prompt_per_second"))
            out["tokens_per_second"] = _num(t.get("predicted_per_second"))
        return out


def usage_from(obj: Any) -> Optional[dict]:
    """The MET-3 token counts of one parsed JSON response body."""
    acc = _UsageAccumulator()
    acc.take(obj)
    return acc.result()


class SSEUsageParser:
    """Incremental MET-3 parser of an SSE body: feed it chunks as they are relayed.

    Only complete lines are looked at; a ``data:`` line is decoded only if it mentions
    ``usage`` or ``timings``. A line longer than 1 MiB is skipped without being kept.
    """

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self._pending = 0
        self._skipping = False
        self._acc = _UsageAccumulator()

    def feed(self, data: bytes) -> None:
        if not self._parts and not self._skipping and data.endswith(b"\n") \
                and b"usage" not in data and b"timings" not in data:
            return  # the usual token chunk: whole lines, nothing to read
        if self._skipping:
            cut = data.find(b"\n")
            if cut < 0:
                return
            self._skipping = False
            data = data[cut + 1:]
        if b"\n" not in data:
            self._hold(data)
            return
        if self._parts:
            self._parts.append(data)
            data = b"".join(self._parts)
            self._parts, self._pending = [], 0
        lines = data.split(b"\n")
        rest = lines.pop()
        for line in lines:
            if line.startswith(b"data:") and (b"usage" in line or b"timings" in line) \
                    and len(line) <= MAX_SSE_LINE:
                self._line(line)
        if rest:
            self._hold(rest)

    def _hold(self, data: bytes) -> None:
        self._pending += len(data)
        if self._pending > MAX_SSE_LINE:
            self._parts, self._pending, self._skipping = [], 0, True
            return
        self._parts.append(data)

    def _line(self, line: bytes) -> None:
        payload = line[5:].strip()
        if payload == b"[DONE]":
            return
        try:
            obj = json.loads(payload)
        except ValueError:
            return
        self._acc.take(obj)

    def result(self) -> Optional[dict]:
        return self._acc.result()


class JSONUsageParser:
    """MET-3 for ``application/json``: keep up to 4 MiB, parse once at the end."""

    def __init__(self, limit: int = MAX_JSON_BYTES) -> None:
        self._parts: list[bytes] = []
        self._size = 0
        self._limit = limit

    def feed(self, data: bytes) -> None:
        if self._parts is None:
            return
        self._size += len(data)
        if self._size > self._limit:
            self._parts = None  # larger bodies are relayed but not parsed
            return
        self._parts.append(data)

    def result(self) -> Optional[dict]:
        if not self._parts:
            return None
        try:
            return usage_from(json.loads(b"".join(self._parts)))
        except ValueError:
            return None


def response_parser(status: int, headers: Any) -> Optional[Any]:
    """The MET-3 parser for an upstream response, or None when it is not parsed.

    :param headers: the upstream response's ``twisted.web.http_headers.Headers``.
    """
    if not 200 <= status < 300:
        return None
    encoding = headers.getRawHeaders(b"content-encoding")
    if encoding and any(v.strip().lower() not in (b"", b"identity") for v in encoding):
        return None
    ctype = (headers.getRawHeaders(b"content-type") or [b""])[0].lower()
    if ctype.startswith(b"text/event-stream"):
        return SSEUsageParser()
    mime = ctype.split(b";", 1)[0].strip()
    if mime == b"application/json" or mime.endswith(b"+json"):
        return JSONUsageParser()
    return None
