"""The table of every config key: the one source for the config reader and docs/configuration.rst.

The reader (:mod:`llamaswap.config.schema`) asks this table which keys are valid at each path
(and which llama-swap keys are recognised but not supported), so the reader and the
documentation cannot drift. Regenerate the documentation with::

    python -m llamaswap.config.keys > docs/configuration.rst

This module is longer than the others on purpose: most of it is the table itself, one entry per
key, and the page generator stays next to the rows it renders.

Paths are dotted. A user-chosen name is written as a placeholder: ``<id>`` (a model id),
``<groupId>``, ``<peerId>``, ``<name>`` (a profile name) and ``<selectorId>``. Examples are YAML
text for the value alone; :func:`example_yaml` nests them under their path, with the placeholders
replaced by the names in :data:`SAMPLE_NAMES`.

This module imports nothing from llamaswap, so the config reader can import it. The package's
``__init__`` does not import it either: ``python -m`` must be the first to load it.
"""

from __future__ import annotations

import re
import sys
import textwrap
from typing import Iterable

import attr

__all__ = [
    "KEYS", "KeyDoc", "NOT_IMPLEMENTED", "SAMPLE_NAMES", "SUPPORTED", "UNSUPPORTED", "children", "concrete",
    "example_yaml", "find", "is_secret", "homes_of", "render", "unsupported_children"]

SUPPORTED = "supported"
NOT_IMPLEMENTED = "not implemented yet"
UNSUPPORTED = "not supported"

LLAMASWAP_ONLY = "llamaswap"
BASE = "v89"

SAMPLE_NAMES = {"<id>": "llama", "<groupId>": "chat", "<peerId>": "openrouter", "<name>": "coding",
                "<selectorId>": "coder"}


@attr.s(frozen=True, auto_attribs=True)
class KeyDoc:
    """One config key.

    :param path: dotted path with placeholders, e.g. ``models.<id>.ttl``.
    :param type: the value's type, in words.
    :param default: the value used when the key is absent, in words (RST inline markup allowed).
    :param example: YAML text of an example value (may span lines; nested lines indented by 2).
    :param since: the llama-swap version that introduced the key (``v89`` for the base set that
        llamaswap targets), or ``llamaswap`` for a key llama-swap does not have.
    :param description: what the key does (RST).
    :param status: :data:`SUPPORTED`, :data:`NOT_IMPLEMENTED` (parsed and validated, no effect
        yet) or :data:`UNSUPPORTED` (a llama-swap key that is ignored with a warning).
    :param secret: the value is never echoed in error messages (API keys, environments).
    """

    path: str
    type: str
    default: str
    example: str
    since: str
    description: str
    status: str = SUPPORTED
    secret: bool = False

    @property
    def parent(self) -> str:
        return self.path.rpartition(".")[0]

    @property
    def name(self) -> str:
        return self.path.rpartition(".")[2]


K = KeyDoc
_MODEL = "models.<id>"

KEYS: tuple[KeyDoc, ...] = (
    # -- top level ---------------------------------------------------------------------------
    K("healthCheckTimeout", "integer (seconds)", "``120``", "300", BASE,
      "Longest time a model may take, from the start of its command, to pass its health check "
      "(``models.<id>.checkEndpoint``). A value below 15 is raised to 15, with a warning."),
    K("logLevel", "string", "``info``", "debug", "v102",
      "``debug``, ``info``, ``warn`` or ``error``, in any case. Any other value logs a warning and "
      "``info`` is used."),
    K("logToStdout", "string", "``proxy``", "both", "v178",
      "What goes to the daemon's log: ``proxy`` (llamaswap's own messages), ``upstream`` (the output of "
      "the model servers), ``both`` or ``none``. Any other value is an error."),
    K("startPort", "integer", "``5800``", "10000", "v110",
      "First value of the ``${PORT}`` macro, from 1 to 65535. The models whose ``cmd`` uses ``${PORT}`` "
      "get ports from here, one each, in code-point order of their id. May be written as a global "
      "macro."),
    K("globalTTL", "integer (seconds)", "``0``", "600", "v197",
      "Default ``ttl`` for the models that do not set one. ``0`` means never unload automatically."),
    K("unloadTimeout", "integer (seconds)", "``10``", "20", "v240",
      "Grace period between asking a model server to stop (``cmdStop`` or SIGTERM) and SIGKILL. "
      "``0`` means 10."),
    K("sendLoadingState", "boolean", "``false``", "true", "v171",
      "Default for ``models.<id>.sendLoadingState``: while a model loads, a streaming "
      "``POST /v1/chat/completions`` gets progress text in ``reasoning_content`` chunks, so chat "
      "interfaces show that something is happening."),
    K("includeAliasesInList", "boolean", "``false``", "true", "v173",
      "List every alias as its own entry in ``GET /v1/models``."),
    K("apiKeys", "list of strings or key mappings", "``[]`` (no authentication)",
      '\n  - key: "${env.LLAMASWAP_KEY}"\n    name: alice\n    models: ["chat-*"]\n    maxConcurrent: 2',
      "v179",
      "When not empty, every request must carry one of these keys (except ``GET /health``, the ``/`` and "
      "``/ui`` redirects and ``OPTIONS``): ``Authorization: Bearer <key>``, ``x-api-key: <key>``, or HTTP "
      "Basic with the key as password; otherwise the answer is 401 ``invalid_api_key``. "
      "Each key must be non-empty and contain no whitespace. Write them as ``${env.NAME}`` to keep them "
      "out of the file. Keys are never logged or echoed in error messages. A plain string is a key with "
      "full access. An entry may instead be a mapping that limits the key (llamaswap only; "
      "docs/sharing.rst): ``key`` (required), ``name`` (shown in the access log and in ``/metrics`` as "
      "``key``; default ``key<N>`` for the N-th entry), ``models`` (globs of the model ids, aliases, "
      "profiles and selectors the key may use; default ``*``; any other model is 403 "
      "``model_not_allowed`` and ``/v1/models`` lists only these), ``admin`` (may unload, load, reload "
      "the config, cancel requests, read ``/logs`` and use ``/upstream``; when no entry sets ``admin``, "
      "every key is an admin; a plain string counts as ``admin: true``), ``maxConcurrent`` (requests "
      "of this key in flight at once, ``0`` for no limit; more get 429 ``key_concurrency_limit``) and "
      "``priority`` (integer; waiting requests of a higher priority are served first, "
      "``scheduler.maxWait`` still bounds every wait).", secret=True),
    K("maxRequestBody", "size", "``1GiB``", "256MiB", LLAMASWAP_ONLY,
      "Largest accepted request body. A larger one gets 413 ``request_too_large`` before any model is "
      "started."),
    K("logTimeFormat", "string", '``""`` (no timestamp)', "rfc3339", "v173",
      "Timestamp at the start of each line of the daemon's log: ``\"\"`` for none, or one of Go's "
      "layout names ``ansic``, ``unixdate``, ``rubydate``, ``rfc822``, ``rfc822z``, ``rfc850``, "
      "``rfc1123``, ``rfc1123z``, ``rfc3339``, ``rfc3339nano``, ``kitchen``, ``stamp``, ``stampmilli``, "
      "``stampmicro`` or ``stampnano``, in any case. Any other value logs a warning and no timestamp "
      "is written."),
    K("metricsMaxInMemory", "integer", "``1000``", "5000", "v140",
      "How many finished requests the activity record keeps in memory (``/api/metrics`` and the web "
      "UI's activity page); the oldest are dropped first. Without effect when ``store.path`` is set: "
      "the database keeps them."),
    K("captureBuffer", "integer (megabytes)", "``5``", "15", "v190",
      "Memory for the request and response bodies captured with each request "
      "(``/api/captures/<id>``); when it is full, the oldest captures are dropped. ``0`` turns "
      "capturing off."),
    K("store", "mapping", "none (activity is kept in memory only)", "{path: /var/lib/llamaswap/activity.sqlite}",
      "v236", "Persistent storage of the request activity."),
    K("store.path", "string (file path)", "required when ``store`` is set", "/var/lib/llamaswap/activity.sqlite",
      "v236",
      "SQLite database file the request activity is written to, so that ``/api/metrics`` and the "
      "activity page survive a restart. A ``store`` without a path is an error."),
    K("ui", "mapping", "``{}``", "{activity: {session_id: [X-Session-ID]}}", "v240",
      "Settings of the web UI."),
    K("ui.activity", "mapping", "``{}``", "{session_id: [X-Session-ID]}", "v240",
      "Settings of the activity page."),
    K("ui.activity.session_id", "list of header names", "``[X-Session-ID, X-Litellm-Session-Id]``",
      "[X-Session-ID, X-Trace-ID]", "v240",
      "Request headers that name a client's session, in order: the first one a request carries, "
      "matched in any case, gives the session shown for it in the activity data. Blank entries and "
      "repeats are dropped; ``[]`` turns the lookup off."),
    K("performance", "mapping", "``{}``", "{every: 15s}", "v212",
      "Sampling of the host's CPU, memory and GPU use, served by ``/api/performance``."),
    K("performance.disabled", "boolean", "``false``", "true", "v212", "Turn the sampling off."),
    K("performance.every", "duration", "``5s``", "15s", "v212",
      "Time between two samples, as a Go duration string: ``15s``, ``1m30s``, ``2h``. At least "
      "``5s``; ``0s`` means the default. A bare number is nanoseconds, as llama-swap reads it, so "
      "``every: 10`` is below the minimum (an error that says to write ``10s``)."),
    K("upstream", "mapping", "``{}``", "{ignorePaths: ['.*\\.ico$']}", "v229",
      "Settings of the ``/upstream/<model>/<path>`` passthrough."),
    K("upstream.ignorePaths", "list of regular expressions",
      "``['.*\\.(js|json|css|png|gif|jpg|jpeg|ico|txt)$']``", "['.*\\.(js|css|png|ico)$', '^/ws$']", "v229",
      "A passthrough request whose ``<path>`` (with its leading ``/``) matches one of these "
      "expressions, anywhere unless anchored, never starts or swaps its model: it is forwarded if "
      "the model is ready, else answered 409. So the static files and polling of a model's web page "
      "do not swap models. An invalid expression is an error naming it; an empty list means the "
      "default."),
    K("macros", "mapping of name to string, number or boolean", "``{}``",
      '\n  server: /opt/llama.cpp/bin/llama-server\n  common: "--host 127.0.0.1 --port ${PORT}"', "v123",
      "Global macros: ``${name}`` is replaced in every value of the file, model values included (map "
      "keys are left alone, except those of ``filters.setParamsByID``). Names match "
      "``[A-Za-z0-9_-]{1,63}``; ``PORT``, ``MODEL_ID``, ``PID`` and ``CACHE_DIR`` (``keepCache.dir``) are "
      "reserved. A macro may use the "
      "macros declared before it. A value that is exactly ``${name}`` keeps the macro's type (a number "
      "stays a number). Any ``${...}`` left after expansion is an error (except ``${PID}`` in "
      "``cmdStop``)."),
    K("models", "mapping of id to model", "``{}``",
      "\n  llama:\n    cmd: llama-server --port ${PORT} -m /models/llama-3.1-8b.gguf --slot-save-path ${CACHE_DIR}",
      BASE,
      "The models, by id. An id is any non-empty string without control characters; it may contain "
      "``/``, ``:`` and ``.``. Requests name a model by id or alias in their ``model`` field."),

    # -- models.<id>.* -----------------------------------------------------------------------
    K(f"{_MODEL}.cmd", "string", "required",
      "|\n  llama-server --port ${PORT}\n  -m /models/llama-3.1-8b.gguf\n  # -c 32768   (comment line: removed)\n"
      "  -c 16384", BASE,
      "Command line of the model server. Lines whose first non-blank character is ``#`` are removed, "
      "macros are expanded, a line ending in ``\\`` continues on the next, and the text is split into "
      "words with POSIX shell quoting (no variables, globs or pipes: use ``bash -c '...'`` for those). "
      "A program without ``/`` is looked up in ``PATH``. An empty command or an unterminated quote is "
      "an error."),
    K(f"{_MODEL}.cmdStop", "string", '``""`` (SIGTERM)', "docker stop ${MODEL_ID}", "v118",
      "Command that stops the model server instead of SIGTERM, parsed like ``cmd``. ``${PID}`` (the "
      "server's process id) is allowed here only. ``unloadTimeout`` still applies."),
    K(f"{_MODEL}.proxy", "URL", "``http://localhost:${PORT}``", "http://127.0.0.1:${PORT}", BASE,
      "Base URL requests are forwarded to: ``http`` or ``https``, a host, and an optional base path. "
      "Set it when the server's port is not ``${PORT}``. Using ``${PORT}`` here when ``cmd`` does not "
      "is an error."),
    K(f"{_MODEL}.env", "list of strings", "``[]``", '["CUDA_VISIBLE_DEVICES=0"]', BASE,
      "``KEY=VALUE`` entries added to the daemon's environment for the model server; later entries win. "
      "Values are never echoed in error messages.", secret=True),
    K(f"{_MODEL}.aliases", "list of strings", "``[]``", "[gpt-4o-mini, llama3]", BASE,
      "Other names for the model. An alias must be non-empty, unique across the whole config, and "
      "different from every id."),
    K(f"{_MODEL}.checkEndpoint", "string", "``/health``", "/health", BASE,
      "Path polled until it answers 200 before requests are forwarded. ``none`` disables the check "
      "(the model is ready as soon as it is started). A leading ``/`` is added if missing."),
    K(f"{_MODEL}.ttl", "integer (seconds)", "unset (``globalTTL`` applies)", "600", BASE,
      "Unload the model after this many idle seconds. ``0`` means never; ``-1`` means unset (as in "
      "llama-swap). A model is never unloaded while a request is in flight."),
    K(f"{_MODEL}.unloadTimeout", "integer (seconds)", "the top-level ``unloadTimeout``", "60", "v240",
      "This model's grace period between stop and SIGKILL (useful for a slow ``cmdStop`` such as "
      "``docker stop``). ``0`` means the top-level value."),
    K(f"{_MODEL}.useModelName", "string", '``""``', "llama3.1", "v95",
      "Value sent upstream in the ``model`` field instead of the name the client used."),
    K(f"{_MODEL}.unlisted", "boolean", "``false``", "true", BASE,
      "Leave the model out of ``GET /v1/models`` and the ``/upstream`` listing. It can still be "
      "requested."),
    K(f"{_MODEL}.name", "string", '``""``', "Llama 3.1 8B", "v134",
      "Display name for ``/v1/models``, ``/running`` and the web UI."),
    K(f"{_MODEL}.description", "string", '``""``', "general chat", "v134",
      "Display description for ``/v1/models``, ``/running`` and the web UI."),
    K(f"{_MODEL}.metadata", "mapping", "``{}``", '{family: llama, port: "${PORT}"}', "v163",
      "Free-form data published under ``meta.llamaswap`` in ``GET /v1/models``. Macros are expanded "
      "and keep their type, so ``\"${PORT}\"`` becomes a number."),
    K(f"{_MODEL}.concurrencyLimit", "integer", "``0`` (meaning 10)", "4", "v112",
      "Most requests admitted for this model at once, waiting and in flight together. More get 429 "
      "``concurrency_limit``."),
    K(f"{_MODEL}.filters", "mapping", "``{}``", '{stripParams: "top_k, mirostat"}', "v131",
      "Changes made to JSON request bodies before they are forwarded, in this order: ``useModelName``, "
      "``stripParams``, ``setParams``, ``setParamsByID``. The ``model`` field is protected: stripping or "
      "setting it is ignored, with a warning."),
    K(f"{_MODEL}.filters.stripParams", "string", '``""``', '"top_k, mirostat"', "v163",
      "Comma-separated body keys to remove."),
    K(f"{_MODEL}.filters.strip_params", "string", '``""``', '"top_k"', "v131",
      "Older spelling of ``stripParams``. Setting both is an error."),
    K(f"{_MODEL}.filters.setParams", "mapping", "``{}``",
      "\n  temperature: 0.7\n  chat_template_kwargs.enable_thinking: false", "v184",
      "Body keys to set or override. A dotted key names a nested field (``a.b`` is field ``b`` of "
      "object ``a``; ``\\.`` is a literal dot)."),
    K(f"{_MODEL}.filters.setParamsByID", "mapping of name to mapping", "``{}``",
      '\n  "${MODEL_ID}:creative": {temperature: 1.1}', "v194",
      "Extra body keys applied when the request used that name. Every name except the model's own id "
      "becomes an alias of the model (checked like ``aliases``). Names may use macros."),
    K(f"{_MODEL}.macros", "mapping of name to string, number or boolean", "``{}``", "\n  ctx: 16384", "v163",
      "Macros for this model only. One with the name of a global macro replaces it; ``${MODEL_ID}`` is "
      "the model's id."),
    K(f"{_MODEL}.sendLoadingState", "boolean", "the top-level ``sendLoadingState``", "true", "v171",
      "This model's setting for the loading progress stream (see the top-level key)."),
    K(f"{_MODEL}.memory", "size", "unset (measured or estimated)", "6GiB", LLAMASWAP_ONLY,
      "Memory this model needs, for ``memory.budget``; it wins over the measured and estimated needs "
      "(see ``memory``). A value larger than ``memory.budget`` is an error. Without a budget it has no "
      "effect."),
    K(f"{_MODEL}.timeouts", "mapping", "``{}``", "{connect: 5, responseHeader: 600}", "v200",
      "Network timeouts of the connections to this model's server, in integer seconds; ``0`` means "
      "no limit. The defaults are Go's standard ones, as in llama-swap."),
    K(f"{_MODEL}.timeouts.connect", "integer (seconds)", "``30``", "5", "v200",
      "Longest time to open the TCP connection to the server."),
    K(f"{_MODEL}.timeouts.keepalive", "integer (seconds)", "``30``", "15", "v200",
      "TCP keep-alive period of the connections; ``0`` leaves keep-alive probes off."),
    K(f"{_MODEL}.timeouts.responseHeader", "integer (seconds)", "``0`` (no limit)", "600", "v200",
      "Longest wait, once the request is sent, for the response headers (for a slow model: the time "
      "to the first token of a stream, or to the whole answer otherwise). When it passes, the client "
      "gets a 504."),
    K(f"{_MODEL}.timeouts.tlsHandshake", "integer (seconds)", "``10``", "5", "v200",
      "Longest TLS handshake, for an ``https`` proxy URL."),
    K(f"{_MODEL}.timeouts.expectContinue", "integer (seconds)", "``1``", "2", "v200",
      "How long a request sent with ``Expect: 100-continue`` waits for the server's go-ahead before "
      "sending its body anyway."),
    K(f"{_MODEL}.timeouts.idleConn", "integer (seconds)", "``90``", "30", "v200",
      "How long an idle connection to the server is kept for reuse."),
    K(f"{_MODEL}.compat", "mapping", "``{}``", "{ignoreWebsockets: true}", "v249",
      "Compatibility switches for servers that are not llama-server."),
    K(f"{_MODEL}.compat.ignoreWebsockets", "boolean", "``false``", "true", "v249",
      "WebSocket connections to this model (through ``/upstream``) never start it and do not count as "
      "activity: not toward ``concurrencyLimit``, the ``ttl`` idle time, swap decisions, selector load "
      "or the in-flight list. A web UI that keeps a WebSocket open then cannot keep the model "
      "loaded."),
    K(f"{_MODEL}.capabilities", "mapping", "``{}`` (none listed)", "\n  in: [text, image]\n  tools: true",
      "v225",
      "What the model accepts and produces, listed as ``capabilities`` in ``GET /v1/models`` so that "
      "clients can tell. An empty or all-default mapping lists nothing."),
    K(f"{_MODEL}.capabilities.in", "list of strings", "``[]``", "[text, image]", "v225",
      "Input modalities: ``text``, ``audio`` or ``image``; anything else is an error."),
    K(f"{_MODEL}.capabilities.out", "list of strings", "``[]``", "[text]", "v225",
      "Output modalities: ``text``, ``audio`` or ``image``; anything else is an error."),
    K(f"{_MODEL}.capabilities.tools", "boolean", "``false``", "true", "v225",
      "The model supports function calling."),
    K(f"{_MODEL}.capabilities.reranker", "boolean", "``false``", "true", "v225",
      "The model answers ``/v1/rerank``."),
    K(f"{_MODEL}.capabilities.context", "integer (tokens)", "``0`` (not stated)", "32768", "v225",
      "The longest context the model supports."),

    # -- groups ------------------------------------------------------------------------------
    K("groups", "mapping of group id to group", "``{}``", "\n  chat: {swap: true, members: [llama]}", "v107",
      "Which models may run together. Models in no group form the implicit group ``(default)`` "
      "(``swap: true, exclusive: true, persistent: false``), so with no groups only one model runs at "
      "a time. When a model of group G has to start, a running model of group H is stopped if "
      "H is G and G swaps, or if H is another group, G is exclusive and H is not persistent. "
      "llama-swap's newer spelling is ``routing.router.settings.groups`` (same keys, same effect); a "
      "config may use one or the other, and cannot use ``groups`` together with ``matrix``."),
    K("groups.<groupId>.swap", "boolean", "``true``", "false", "v107",
      "Only one member of the group runs at a time. With ``false``, members run side by side."),
    K("groups.<groupId>.exclusive", "boolean", "``true``", "false", "v107",
      "Starting a member stops the models of other (non-persistent) groups."),
    K("groups.<groupId>.persistent", "boolean", "``false``", "true", "v107",
      "Other groups never stop this group's models."),
    K("groups.<groupId>.members", "list of model ids", "``[]``", "[llama]", "v107",
      "The models in the group: ids, not aliases. A model belongs to one group at most. A name that "
      "is not a model id logs a warning and is ignored (llama-swap does not check members; its "
      "example config names models it does not define)."),

    # -- profiles ----------------------------------------------------------------------------
    K("profiles", "mapping of name to list of models, or to ``{description, pins}``", "``{}``",
      "\n  coding: [llama]", BASE,
      "Two kinds of profile, told apart by their value. **A list** (llama-swap v89's form): models "
      "meant to run together. A request for ``<profile>:<model>`` (an entry of the profile) starts "
      "that model if needed, stopping the running models outside the profile (except members of "
      "persistent groups) but never another member. It does not start the whole profile. Entries are "
      "ids or aliases; the name must be non-empty and must not contain ``:``. **A mapping** (llama-swap "
      "v241's form, keys below): runtime pins. One such profile or none is active; none is after "
      "startup and after a reload. ``GET /api/profiles`` lists them and ``PUT /api/profiles/active`` "
      "switches. While a profile is active, a request for a pinned id goes to the pin's target; "
      "pins apply before aliases, filters and routing."),
    K("profiles.<name>.description", "string", '``""``', "Coding-focused models", "v241",
      "Shown by ``GET /api/profiles`` and the web UI."),
    K("profiles.<name>.pins", "mapping of requested id to target", "required (at least one)",
      "{llm-code: llama, old-model: ~}", "v241",
      "Each requested id (any name: an existing id, alias or peer model is shadowed while the "
      "profile is active) and its target: a model id, an alias (``setParamsByID`` names included), a "
      "peer model or a selector id. A target of ``~`` or ``\"\"`` disables the id: requests for it get "
      "a 404 while the profile is active. A target that names nothing configured logs a warning "
      "(llama-swap rejects it; its own example config has one). A pinned id may not be the "
      "``<peerId>/<model>`` name of a peer model."),

    # -- selectors ---------------------------------------------------------------------------
    K("selectors", "mapping of selector id to selector", "``{}``",
      "\n  coder:\n    strategy: warm\n    targets: [llama]", "v241",
      "Virtual model ids: a request for a selector id goes to one of its targets, chosen per request "
      "by its strategy. Selectors are listed in ``GET /v1/models`` (unless ``unlisted``), apply after "
      "profile pins, and cannot be used under ``/upstream/``. A selector id may not be a model id, an "
      "alias or a peer model's ``<peerId>/<model>`` name."),
    K("selectors.<selectorId>.strategy", "string", "required", "spillover", "v241",
      "``pin``: always the first target (the others are kept for reference). ``warm``: the first "
      "target that is ready, else one already starting, else a cold start of the first target; its "
      "targets must be local models or aliases. ``spillover``: targets in order, each taking up to "
      "``settings.spillover`` requests in flight before the next one is used (and started); its "
      "local targets must be able to run together: members of one group with ``swap: false``, or "
      "together in one set of the matrix (with ``memory.budget``, models in no group also qualify). "
      "``failover`` (llamaswap only): the first target, and the next one when a target fails to start "
      "or answers a 5xx or drops the connection before the first byte of its response; a target that "
      "failed ``settings.failures`` times in a row is skipped for ``settings.cooldown`` seconds. Any "
      "other value is an error."),
    K("selectors.<selectorId>.targets", "list of model names", "required (at least one)",
      "[llama, openrouter/meta-llama/llama-3.1-70b]", "v241",
      "Model ids, aliases or peer models, in order. A selector id is an error (selectors do not "
      "chain), so is the same model twice for ``spillover`` and ``failover``. A name that matches "
      "nothing configured logs a warning and is left out (llama-swap rejects it; its own example "
      "config has some); a selector left with no target is an error."),
    K("selectors.<selectorId>.settings", "mapping", "``{}``", "{spillover: 4}", "v241",
      "Settings of the strategy."),
    K("selectors.<selectorId>.settings.spillover", "integer", "``1``", "4", "v241",
      "For ``spillover``: requests in flight per target before the next target is used. At least 1."),
    K("selectors.<selectorId>.settings.failures", "integer", "``3``", "5", LLAMASWAP_ONLY,
      "For ``failover``: failures in a row after which a target is skipped. At least 1."),
    K("selectors.<selectorId>.settings.cooldown", "number (seconds)", "``60``", "30", LLAMASWAP_ONLY,
      "For ``failover``: how long a skipped target is skipped; then one request tries it again."),
    K("selectors.<selectorId>.name", "string", '``""``', "Coding model", "v241",
      "Display name in ``GET /v1/models``."),
    K("selectors.<selectorId>.description", "string", '``""``', "The best loaded coding model", "v241",
      "Display description in ``GET /v1/models``."),
    K("selectors.<selectorId>.unlisted", "boolean", "``false``", "true", "v241",
      "Leave the selector out of ``GET /v1/models``; it can still be requested."),
    K("selectors.<selectorId>.metadata", "mapping", "``{}``", "{purpose: coding}", "v241",
      "Free-form data listed with the selector in ``GET /v1/models``."),

    # -- hooks -------------------------------------------------------------------------------
    K("hooks", "mapping", "``{}``", "\n  on_startup: {preload: [llama]}", "v151",
      "Actions run by the daemon itself."),
    K("hooks.on_startup", "mapping", "``{}``", "{preload: [llama]}", "v151",
      "Actions run after the daemon starts, and after a reload that changes them."),
    K("hooks.on_startup.preload", "list of model names", "``[]``", "[llama]", "v151",
      "Ids or aliases to load after startup, and after every reload that changes this list or a listed "
      "model. Unknown names log a warning and are skipped; a failed load logs an error. A selector id "
      "cannot be preloaded: it is dropped, with a warning."),

    # -- peers -------------------------------------------------------------------------------
    K("peers", "mapping of peer id to peer", "``{}``",
      "\n  openrouter:\n    proxy: https://openrouter.ai/api\n    models: [meta-llama/llama-3.1-70b]", "v179",
      "Other OpenAI-compatible servers whose models are served too, as ``<peerId>/<model>`` (or the bare "
      "model name, when no local model has it and only one peer lists it). Peers have no process, TTL, "
      "swap or concurrency limit."),
    K("peers.<peerId>.proxy", "URL", "required", "https://openrouter.ai/api", "v179",
      "Base URL of the peer; the request path is appended."),
    K("peers.<peerId>.apiKey", "string", '``""``', '"${env.OPENROUTER_KEY}"', "v179",
      "Sent as ``Authorization: Bearer`` and ``x-api-key`` instead of the client's credentials.",
      secret=True),
    K("peers.<peerId>.models", "list of strings", "required", "[meta-llama/llama-3.1-70b]", "v179",
      "The peer's model names (not empty)."),
    K("peers.<peerId>.filters", "mapping", "``{}``", '{stripParams: "top_k"}', "v184",
      "Like ``models.<id>.filters``, with ``stripParams`` and ``setParams`` only."),
    K("peers.<peerId>.filters.stripParams", "string", '``""``', '"top_k"', "v184",
      "Comma-separated body keys to remove."),
    K("peers.<peerId>.filters.setParams", "mapping", "``{}``", "{temperature: 0.2}", "v184",
      "Body keys to set or override."),
    K("peers.<peerId>.timeouts", "mapping", "``{}``", "{connect: 5, responseHeader: 300}", "v200",
      "Network timeouts of the connections to this peer, in integer seconds, ``0`` for no limit: "
      "the keys of ``models.<id>.timeouts``, with the same defaults except ``responseHeader``."),
    K("peers.<peerId>.timeouts.connect", "integer (seconds)", "``30``", "5", "v200",
      "Longest time to open the TCP connection to the peer."),
    K("peers.<peerId>.timeouts.keepalive", "integer (seconds)", "``30``", "15", "v200",
      "TCP keep-alive period of the connections; ``0`` leaves keep-alive probes off."),
    K("peers.<peerId>.timeouts.responseHeader", "integer (seconds)", "``60``", "300", "v200",
      "Longest wait, once the request is sent, for the response headers; then the client gets a "
      "504. ``0`` means no limit."),
    K("peers.<peerId>.timeouts.tlsHandshake", "integer (seconds)", "``10``", "5", "v200",
      "Longest TLS handshake, for an ``https`` peer."),
    K("peers.<peerId>.timeouts.expectContinue", "integer (seconds)", "``1``", "2", "v200",
      "How long a request sent with ``Expect: 100-continue`` waits for the peer's go-ahead."),
    K("peers.<peerId>.timeouts.idleConn", "integer (seconds)", "``90``", "30", "v200",
      "How long an idle connection to the peer is kept for reuse."),

    # -- scheduler ---------------------------------------------------------------------------
    K("scheduler", "mapping", "``{}``", "\n  maxWait: 10\n  policy: swap-aware", LLAMASWAP_ONLY,
      "How waiting requests are ordered when models have to be swapped. (llama-swap's own scheduler "
      "settings are under ``routing.scheduler``.)"),
    K("scheduler.maxWait", "number (seconds)", "``30``", "10", LLAMASWAP_ONLY,
      "How long requests for an already-loaded model may keep overtaking a request that needs a swap. "
      "After that, the loaded model drains: new requests for it wait, and the swap happens once its "
      "in-flight requests end. ``0`` gives strict arrival order."),
    K("scheduler.policy", "string", "``swap-aware``", "fifo", LLAMASWAP_ONLY,
      "``swap-aware`` batches requests for a loaded model as described under ``maxWait``. ``fifo`` grants "
      "no request while an older request for another model waits (llama-swap's order, for "
      "comparisons). Any other value is an error."),

    # -- memory ------------------------------------------------------------------------------
    K("memory", "mapping", "``{}``", "\n  budget: 48GiB", LLAMASWAP_ONLY,
      "Memory-aware co-residence: models share the machine as long as their memory needs fit a "
      "budget (docs/memory.rst). A model's need is its ``memory`` if set, else the most it was seen "
      "to use, else an estimate from its ``-m``/``--model`` file plus ``overhead``; a model whose need "
      "is unknown counts as the whole budget."),
    K("memory.budget", "size", "unset (memory accounting off)", "48GiB", LLAMASWAP_ONLY,
      "Total memory the running models may need. When set, the models in no group (``(default)``) "
      "no longer swap each other out: they run together as long as they fit. Explicit groups keep "
      "their rules and apply first; then, if the model to start still does not fit, idle models "
      "outside persistent groups are stopped to make room (see ``policy``). A model that needs more "
      "than the whole budget is refused."),
    K("memory.overhead", "size", "``1GiB``", "512MiB", LLAMASWAP_ONLY,
      "Added to the estimate from a model's ``-m``/``--model`` file, for the models that do not set "
      "``memory``."),
    K("memory.policy", "string", "``cost``", "lru", LLAMASWAP_ONLY,
      "Which idle models are stopped to make room: ``cost`` stops those whose reload is expected to "
      "cost least (load time times how often the model is asked for); ``lru`` stops the least "
      "recently used first. Any other value is an error."),

    # -- routing (llama-swap's router and scheduler) ----------------------------------------
    K("routing", "mapping", "``{}``", "{scheduler: {use: fifo}}", "v225",
      "llama-swap's routing section: ``router`` decides which models may run together (groups or the "
      "swap matrix), ``scheduler`` how queued requests are ordered."),
    K("routing.router", "mapping", "``{}``", "{use: group}", "v225",
      "The swap engine and its settings. It replaces the top-level ``groups`` and ``matrix``: a config "
      "that uses both styles is an error (``groups: cannot be used together with routing.router (move "
      "it to routing.router.settings.groups)``)."),
    K("routing.router.use", "string", "``group``", "matrix", "v225",
      "``group`` (the groups of ``settings.groups``) or ``matrix`` (``settings.matrix``, which must then "
      "be set). Any other value is an error. Both settings may be written; as in llama-swap, only "
      "the one in use is checked and applies (unknown keys in the other still warn)."),
    K("routing.router.settings", "mapping", "``{}``", "\n  groups:\n    chat: {members: [llama]}", "v225",
      "The settings of each engine."),
    K("routing.router.settings.groups", "mapping of group id to group", "``{}``",
      "\n  chat: {swap: true, members: [llama]}", "v225",
      "The groups, exactly as the top-level ``groups`` (same keys, defaults and checks; errors name "
      "this path)."),
    K("routing.router.settings.matrix", "mapping", "none", "\n  vars: {l: llama}\n  sets: {solo: l}", "v225",
      "The swap matrix (docs/matrix.rst): the combinations of models that may run together. When a "
      "model has to start, the running models outside the cheapest combination holding it are "
      "stopped; a model in no set runs alone."),
    K("routing.router.settings.matrix.vars", "mapping of name to model id", "``{}``", "{l: llama}", "v225",
      "Short names for model ids (not aliases), usable in ``sets`` and ``evict_costs``. A name is 1 to "
      "32 letters, digits, ``-`` or ``.``; a var wins over a model of the same name."),
    K("routing.router.settings.matrix.evict_costs", "mapping of var or model id to positive integer",
      "``{}`` (every model costs 1)", "{l: 5}", "v225",
      "How costly stopping a running model is. Each model gets its cost once, by var or by id."),
    K("routing.router.settings.matrix.sets", "mapping of name to expression", "required (at least one)",
      '\n  solo: llama\n  again: "+solo"', "v225",
      "Named set expressions: model ids or vars joined with ``&`` (together), ``|`` (either), "
      "parentheses, and ``+name`` (another set's expression). Mistakes are reported with the "
      "position of the bad token."),
    K("routing.scheduler", "mapping", "``{}``", "{use: fifo}", "v225",
      "llama-swap's scheduler. llamaswap orders requests as ``scheduler.policy`` says; this section "
      "is read and checked as llama-swap does."),
    K("routing.scheduler.use", "string", "``fifo``", "fifo", "v225",
      "The only scheduler, ``fifo``; any other value is an error. It does not change "
      "``scheduler.policy``."),
    K("routing.scheduler.settings", "mapping", "``{}``", "{fifo: {priority: {llama: 10}}}", "v225",
      "The scheduler's settings."),
    K("routing.scheduler.settings.fifo", "mapping", "``{}``", "{priority: {llama: 10}}", "v225",
      "Settings of the ``fifo`` scheduler."),
    K("routing.scheduler.settings.fifo.priority", "mapping of model name to integer", "``{}`` (every "
      "model 0)", "{llama: 10}", "v225",
      "Among requests waiting for a model to start, a model with a higher priority goes first (ids "
      "or aliases of configured models, integer values). ``scheduler.maxWait`` still bounds every "
      "wait: a request that has waited that long goes before any that has not, oldest first. A name "
      "that is not a configured model logs a warning and is ignored (llama-swap rejects it, but its "
      "example config has some)."),
    K("matrix", "mapping", "none", "\n  sets: {solo: llama}", "v202",
      "llama-swap's older spelling of ``routing.router.settings.matrix`` (same keys), which it turns "
      "on. It cannot be used together with ``groups`` or ``routing.router``."),

    # -- keep-alive of a model (llamaswap only; docs/sharing.rst) ------------------------------
    K(f"{_MODEL}.restart", "string", "``no``", "on-failure", LLAMASWAP_ONLY,
      "``on-failure`` restarts the model when its server dies without being asked to stop (a crash, "
      "a start that fails by itself, or ``healthFailures`` failed health checks in a row), after a "
      "wait that doubles with each restart in a row (``restartDelay``, ``restartMaxDelay``). Meant for "
      "preloaded models and members of persistent groups. A restart that would stop another model is "
      "skipped. Each restart is logged with the last lines of the previous run's output. ``no`` "
      "leaves a dead model stopped until the next request for it."),
    K(f"{_MODEL}.maxRestarts", "integer", "``5``", "3", LLAMASWAP_ONLY,
      "Restarts in a row before llamaswap gives up: the model is then shown as ``failed``, with the "
      "reason, in ``/running`` and ``/api/models`` until a request or ``POST /api/models/load`` starts "
      "it again. A run that stays ready for ``restartMaxDelay`` seconds starts the count again. ``0`` "
      "means no limit."),
    K(f"{_MODEL}.restartDelay", "number (seconds)", "``1``", "2", LLAMASWAP_ONLY,
      "Wait before the first restart of a row; each further restart waits twice as long as the one "
      "before. Must be positive."),
    K(f"{_MODEL}.restartMaxDelay", "number (seconds)", "``60``", "120", LLAMASWAP_ONLY,
      "The longest wait before a restart (not less than ``restartDelay``)."),
    K(f"{_MODEL}.healthInterval", "number (seconds)", "``0`` (off)", "30", LLAMASWAP_ONLY,
      "Poll the ready model's ``checkEndpoint`` this often. After ``healthFailures`` failed polls in a "
      "row the model is stopped, then restarted when ``restart`` is ``on-failure``, else shown as "
      "``failed``. Needs a ``checkEndpoint`` other than ``none``."),
    K(f"{_MODEL}.healthFailures", "integer", "``3``", "5", LLAMASWAP_ONLY,
      "Failed health polls in a row (an answer other than 200, or none within 2 seconds) that count "
      "as a failure. At least 1."),

    # -- keepCache and a model's hooks (llamaswap only; docs/kvcache.rst) ----------------------
    K("keepCache", "boolean or mapping", "``false``", "\n  maxBytes: 8GiB\n  saveTimeout: 20", LLAMASWAP_ONLY,
      "Default for ``models.<id>.keepCache``: save llama-server's KV cache (its slots) when a model is "
      "stopped on purpose, and restore it at the next start of the same command, so a conversation "
      "that comes back after a swap is not processed again (docs/kvcache.rst). The default applies "
      "only to the models whose ``cmd`` has ``--slot-save-path``. ``true`` turns it on with the "
      "defaults below; a mapping turns it on unless it sets ``enabled: false``."),
    K("keepCache.enabled", "boolean", "``true`` (in a mapping)", "false", LLAMASWAP_ONLY,
      "``false`` keeps the other settings but turns saving and restoring off."),
    K("keepCache.dir", "string (absolute path)", "beside the state file", "/var/cache/llamaswap", LLAMASWAP_ONLY,
      "Where ``${CACHE_DIR}`` points: ``<dir>/<model id>`` for each model (an id that is not a safe "
      "file name gets its other characters replaced by ``_`` and a short hash appended). By default "
      "``<dir>`` is the state file's name with ``.kvcache`` for ``.json``: "
      "``$XDG_RUNTIME_DIR/llamaswap/children.kvcache``, else ``/tmp/llamaswap-<uid>/children.kvcache``, "
      "or ``<pidfile>.children.kvcache`` with ``--pidfile``. Those are often in memory (tmpfs): "
      "point ``dir`` at a disk for large caches. A relative path is an error."),
    K("keepCache.maxBytes", "size", "``4GiB``", "16GiB", LLAMASWAP_ONLY,
      "Per model: after each save the model's files are deleted, oldest first, until they take at "
      "most this much. Must be more than 0."),
    K("keepCache.saveTimeout", "number (seconds)", "``10``", "30", LLAMASWAP_ONLY,
      "How long the saves before a stop may take, in all. A save that fails or runs out of time is "
      "logged and the stop goes on: it never waits longer than this."),
    K("keepCache.restoreTimeout", "number (seconds)", "``30``", "60", LLAMASWAP_ONLY,
      "How long the restores at a start may take, in all; it counts in the model's load time. A "
      "restore that fails or runs out of time is logged and the model starts cold."),
    K(f"{_MODEL}.keepCache", "boolean or mapping", "the top-level ``keepCache``", "true", LLAMASWAP_ONLY,
      "This model's ``keepCache``: the same keys as the top-level one, each unset key taking the "
      "top-level value. Setting it (to anything but ``false``) needs ``--slot-save-path`` in ``cmd``, "
      "or the config is invalid: write ``--slot-save-path ${CACHE_DIR}``. ``false`` turns it off for "
      "this model. The ``--slot-save-path`` directory must be an absolute path; it is created before "
      "the model starts. The saved files are keyed by the expanded ``cmd`` and ``env``: a changed "
      "command never restores files saved by another."),
    K(f"{_MODEL}.keepCache.enabled", "boolean", "``true`` (in a mapping)", "false", LLAMASWAP_ONLY,
      "As the top-level ``keepCache.enabled``, for this model."),
    K(f"{_MODEL}.keepCache.dir", "string (absolute path)", "the top-level ``keepCache.dir``", "/fast/kv",
      LLAMASWAP_ONLY, "This model's ``${CACHE_DIR}`` is ``<dir>/<model id>``."),
    K(f"{_MODEL}.keepCache.maxBytes", "size", "the top-level ``keepCache.maxBytes``", "8GiB", LLAMASWAP_ONLY,
      "As the top-level ``keepCache.maxBytes``, for this model."),
    K(f"{_MODEL}.keepCache.saveTimeout", "number (seconds)", "the top-level ``keepCache.saveTimeout``", "20",
      LLAMASWAP_ONLY, "As the top-level ``keepCache.saveTimeout``, for this model."),
    K(f"{_MODEL}.keepCache.restoreTimeout", "number (seconds)", "the top-level ``keepCache.restoreTimeout``",
      "60", LLAMASWAP_ONLY, "As the top-level ``keepCache.restoreTimeout``, for this model."),
    K(f"{_MODEL}.hooks", "mapping", "``{}``", "\n  afterReady:\n  - {method: POST, path: /wake_up}",
      LLAMASWAP_ONLY,
      "HTTP calls made to the model's own ``proxy`` URL around its planned stops and its starts, for "
      "servers with their own cache or sleep endpoints (docs/kvcache.rst)."),
    K(f"{_MODEL}.hooks.beforeStop", "list of HTTP calls", "``[]``",
      '\n  - {method: POST, path: "/slots/0?action=save", body: {filename: chat.bin}}', LLAMASWAP_ONLY,
      "Calls made in order before the model is stopped on purpose (a swap, ttl, unload, a reload that "
      "restarts it, shutdown), after the ``keepCache`` save and before ``cmdStop`` or SIGTERM. Each "
      "call is a mapping: ``method`` (GET, POST, PUT, PATCH or DELETE; default POST), ``path`` "
      "(required, starts with ``/``, may carry a query), ``body`` (sent as JSON when present) and "
      "``timeout`` (seconds, default 10). A call that fails, answers an error or runs out of time is "
      "logged and the next one runs. A model that crashed gets no calls."),
    K(f"{_MODEL}.hooks.afterReady", "list of HTTP calls", "``[]``",
      '\n  - {method: POST, path: "/slots/0?action=restore", body: {filename: chat.bin}}', LLAMASWAP_ONLY,
      "Calls made in order once the model passes its health check (after the ``keepCache`` restore) "
      "and before any request is forwarded to it: requests waiting for the start wait for them too, "
      "and their time counts in the load time. Same form as ``beforeStop``."),

    # -- llama-swap keys llamaswap recognises but does not support ---------------------------
    K("logRequests", "boolean", "none", "true", BASE,
      "llama-swap's old request logging switch. llama-swap v250 still reads it but nothing uses it, so "
      "it has no effect there either; llamaswap's access log is always on.", status=UNSUPPORTED),
    K(f"{_MODEL}.healthCheckTimeout", "integer", "none", "300", "v218",
      "llama-swap v250 replaces it with the top-level ``healthCheckTimeout`` when it loads a config, so "
      "it has no effect there either; llamaswap uses the top-level value for every model.",
      status=UNSUPPORTED),
)

_BY_PATH = {k.path: k for k in KEYS}
assert len(_BY_PATH) == len(KEYS), "duplicate path in KEYS"


# --------------------------------------------------------------------------------------------
# Queries used by the config reader


def join(parent: str, key: str) -> str:
    return f"{parent}.{key}" if parent else key


def find(path: str) -> KeyDoc | None:
    """The row for a placeholder path (``models.<id>.ttl``), or None."""
    return _BY_PATH.get(path)


def _under(parent: str, statuses: Iterable[str]) -> frozenset:
    wanted = set(statuses)
    return frozenset(k.name for k in KEYS if k.parent == parent and k.status in wanted
                     and not k.name.startswith("<"))


def children(parent: str) -> frozenset:
    """The keys the reader takes directly under ``parent`` (supported or not implemented yet)."""
    return _under(parent, (SUPPORTED, NOT_IMPLEMENTED))


def unsupported_children(parent: str) -> frozenset:
    """The llama-swap keys directly under ``parent`` that are recognised but ignored."""
    return _under(parent, (UNSUPPORTED,))


def is_secret(path: str) -> bool:
    """True when the value at this placeholder path must never be echoed."""
    row = _BY_PATH.get(path)
    return bool(row and row.secret)


def homes_of(key: str) -> tuple[str, ...]:
    """The parents (placeholder paths) under which ``key`` is a valid key."""
    return tuple(sorted({k.parent for k in KEYS if k.name == key and k.status != UNSUPPORTED}))


# --------------------------------------------------------------------------------------------
# Examples and the generated documentation


def concrete(path: str) -> str:
    """``path`` with its placeholders replaced by :data:`SAMPLE_NAMES`."""
    return ".".join(SAMPLE_NAMES.get(part, part) for part in path.split("."))


def example_yaml(row: KeyDoc) -> str:
    """The row's example as a YAML document, nested under its (concrete) path."""
    parts = concrete(row.path).split(".")
    lines = []
    for depth, part in enumerate(parts[:-1]):
        lines.append("  " * depth + f"{part}:")
    indent = "  " * (len(parts) - 1)
    head, *rest = row.example.split("\n")
    lines.append(f"{indent}{parts[-1]}:" + (f" {head}" if head else ""))
    lines.extend(f"{indent}{line}" if line else "" for line in rest)
    return "\n".join(lines) + "\n"


def since_text(row: KeyDoc) -> str:
    if row.since == LLAMASWAP_ONLY:
        return "llamaswap only (not in llama-swap)"
    if row.since == BASE:
        return f"llama-swap {BASE} (the base set llamaswap follows)"
    return f"llama-swap {row.since}"


_SECTIONS = (
    ("top", "Top level"),
    ("models", "Models: ``models.<id>.*``"),
    ("groups", "Model groups"),
    ("profiles", "Profiles"),
    ("selectors", "Selectors: virtual model ids"),
    ("hooks", "Startup hooks"),
    ("peers", "Peer servers"),
    ("scheduler", "Scheduler (llamaswap only)"),
    ("memory", "Memory (llamaswap only)"),
    ("routing", "Routing (llama-swap's router and scheduler)"),
    ("unsupported", "llama-swap keys that llamaswap recognises but does not support"),
)

_SECTION_TEXT = {
    "models": "Each entry of ``models`` is one model server. Only ``cmd`` is required.",
    "unsupported": (
        "These llama-swap keys are recognised so that a llama-swap config loads unchanged. Each one "
        "present logs ``config: llama-swap key '<path>' is not supported by llamaswap (ignored)`` and has "
        "no other effect; the daemon starts anyway."),
}

_INTRO = """\
Configuration reference
=======================

.. This file is generated from llamaswap/config/keys.py, the table the config reader itself uses:
   edit that table, then run ``python -m llamaswap.config.keys > docs/configuration.rst``.

llamaswap reads one YAML file, the same ``config.yaml`` llama-swap reads. This page lists every key
the config reader knows: its type, its default, an example, and the llama-swap version it comes from.
The reader takes its list of valid keys from the same table this page is generated from, so the two
agree.

How the file is read
--------------------

* The file is UTF-8 YAML 1.2 whose top level is a mapping. Only ``true`` and ``false`` are booleans in
  free-form places (``metadata``, ``setParams``); keys whose type is boolean also accept ``yes``,
  ``no``, ``on`` and ``off``. Anchors, aliases and ``<<`` merge keys work. An empty file is a valid
  config with no models.
* ``${env.NAME}`` is replaced by the environment variable ``NAME`` before the YAML is parsed, except in
  comments. An unset variable is an error.
* Macros (``macros``, ``models.<id>.macros``) are then expanded, and ``${PORT}`` is assigned
  (``startPort``).
* Types are strict: ``ttl: "300"`` is an error. Where a string is expected, a number or boolean is
  taken as written (``useModelName: 3`` gives ``"3"``).
* Every problem is reported at once, one line each, as ``<path>: <message>``; the message shows the
  offending value, shortened, except for secrets (``apiKeys``, ``env``, ``apiKey``)::

      models.llama.ttl: must be a non-negative integer (got 'ten')

* An unknown key is not an error. It logs ``config: unknown key '<path>' (ignored)``, with a
  suggestion when a valid key is close (``...; did you mean 'ttl'?``).
* Durations are integer seconds, except ``performance.every`` (a Go duration such as ``15s``, as in
  llama-swap). Sizes are a number of bytes or a string with a unit: ``B``, ``KB``, ``MB``, ``GB``,
  ``TB`` (powers of 1000) or ``KiB``, ``MiB``, ``GiB``, ``TiB`` (powers of 1024), in any case, e.g.
  ``"12GiB"``.

Paths are written with placeholders for the names you choose: ``<id>`` is a model id, ``<groupId>``
a group, ``<peerId>`` a peer, ``<name>`` a profile and ``<selectorId>`` a selector. *Status* is one of:

* **supported**;
* **not implemented yet**: read and validated, so mistakes are reported, but without effect yet; each
  key present logs ``config: '<path>' is not implemented yet (ignored)``;
* **not supported**: a llama-swap key that llamaswap ignores, with a warning.

*Since* is the llama-swap release that introduced the key. llamaswap follows llama-swap v89 plus the
later keys listed here; "llamaswap only" marks keys llama-swap does not have.
"""


def _section_of(row: KeyDoc) -> str:
    if row.status == UNSUPPORTED:
        return "unsupported"
    first = row.path.split(".", 1)[0]
    if row.path == "matrix":
        return "routing"
    if row.path == "models" or first not in {name for name, _ in _SECTIONS}:
        return "top"
    return first


def _heading(text: str, char: str) -> list[str]:
    return [text, char * len(text), ""]


def _summary(rows: list[KeyDoc]) -> list[str]:
    out = [".. list-table::", "   :header-rows: 1", "", "   * - Key", "     - Type", "     - Default",
           "     - Since", "     - Status"]
    for row in rows:
        since = "llamaswap" if row.since == LLAMASWAP_ONLY else row.since
        out += [f"   * - ``{row.path}``", f"     - {row.type}", f"     - {row.default}", f"     - {since}",
                f"     - {row.status}"]
    return out + [""]


def _wrap(text: str) -> list[str]:
    """``text`` as lines of at most 100 characters, never breaking inside an inline literal."""
    glued = re.sub(r"``.*?``", lambda m: m.group(0).replace(" ", "\0"), text)
    lines = textwrap.wrap(glued, 100, break_long_words=False, break_on_hyphens=False)
    return [line.replace("\0", " ") for line in lines]


def _entry(row: KeyDoc) -> list[str]:
    out = _heading(f"``{row.path}``", "~")
    out += _wrap(row.description) + ["", f":Type: {row.type}", f":Default: {row.default}",
            f":Since: {since_text(row)}", f":Status: {row.status}", "", ".. code:: yaml", ""]
    out += [f"   {line}" if line else "" for line in example_yaml(row).rstrip("\n").split("\n")]
    return out + [""]


def render() -> str:
    """The text of docs/configuration.rst."""
    out = _INTRO.split("\n")
    out += _heading("Summary", "-")
    out += _summary(list(KEYS))
    for section, title in _SECTIONS:
        rows = [k for k in KEYS if _section_of(k) == section]
        out += _heading(title, "-")
        if section in _SECTION_TEXT:
            out += _wrap(_SECTION_TEXT[section]) + [""]
        for row in rows:
            out += _entry(row)
    return "\n".join(out).rstrip("\n") + "\n"


def main() -> None:
    sys.stdout.write(render())


if __name__ == "__main__":
    main()
