"""Errors carry their HTTP status and OpenAI code and render in one envelope (ERR-1, ERR-2)."""
from __future__ import annotations

import json

from twisted.trial.unittest import SynchronousTestCase

from llamaswap import errors
from llamaswap.errors import error_body, to_openai_error

#: ERR-2: class -> (status, type, code)
TABLE = {
    errors.InvalidJSON: (400, "invalid_request_error", "invalid_json"),
    errors.InvalidMultipart: (400, "invalid_request_error", "invalid_multipart"),
    errors.MissingModel: (400, "invalid_request_error", "missing_model"),
    errors.InvalidAPIKey: (401, "authentication_error", "invalid_api_key"),
    errors.ModelNotFound: (404, "invalid_request_error", "model_not_found"),
    errors.NotFound: (404, "invalid_request_error", "not_found"),
    errors.RequestTooLarge: (413, "invalid_request_error", "request_too_large"),
    errors.ConcurrencyLimit: (429, "rate_limit_error", "concurrency_limit"),
    errors.UpstreamStartFailed: (502, "server_error", "upstream_start_failed"),
    errors.UpstreamUnreachable: (502, "server_error", "upstream_unreachable"),
    errors.PeerUnreachable: (502, "server_error", "peer_unreachable"),
    errors.ModelUnloaded: (503, "server_error", "model_unloaded"),
    errors.ShuttingDown: (503, "server_error", "shutting_down"),
    errors.InvalidConfig: (400, "invalid_request_error", "invalid_config"),
}


class ErrorTableTests(SynchronousTestCase):
    def test_table(self):
        """ERR-2: every situation has its status, type and code."""
        for cls, (status, kind, code) in TABLE.items():
            exc = cls("m") if cls not in (errors.MissingModel, errors.InvalidAPIKey,
                                          errors.ShuttingDown) else cls()
            got_status, _, body = to_openai_error(exc)
            self.assertEqual(got_status, status, cls)
            error = json.loads(body)["error"]
            self.assertEqual((error["type"], error["code"]), (kind, code), cls)

    def test_envelope(self):
        """ERR-1: {"error": {"message", "type", "param": null, "code"}}, compact UTF-8."""
        status, headers, body = to_openai_error(errors.ModelNotFound.named("qwén"))
        self.assertEqual(status, 404)
        self.assertEqual(headers, {})
        self.assertEqual(body, '{"error":{"message":"model \'qwén\' not found","type":'
                               '"invalid_request_error","param":null,"code":"model_not_found"}}'
                         .encode("utf-8"))

    def test_default_messages(self):
        """ERR-2: the recommended wordings."""
        self.assertEqual(errors.MissingModel().message, "missing or invalid 'model' key")
        self.assertEqual(errors.InvalidAPIKey().message, "unauthorized: invalid or missing API key")

    def test_extra_headers(self):
        """429 carries Retry-After: 1; 401 carries WWW-Authenticate; 405 carries Allow."""
        self.assertEqual(to_openai_error(errors.ConcurrencyLimit("x"))[1], {b"Retry-After": b"1"})
        self.assertEqual(to_openai_error(errors.InvalidAPIKey())[1],
                         {b"WWW-Authenticate": b'Basic realm="llamaswap"'})
        status, headers, body = to_openai_error(errors.MethodNotAllowed(["GET", "OPTIONS"]))
        self.assertEqual(status, 405)
        self.assertEqual(headers, {b"Allow": b"GET, OPTIONS"})
        self.assertEqual(json.loads(body)["error"]["code"], "method_not_allowed")

    def test_headers_not_shared_between_instances(self):
        """Rendering returns a copy: callers may add headers (CORS) without leaking them."""
        _, headers, _ = to_openai_error(errors.ConcurrencyLimit("x"))
        headers[b"Access-Control-Allow-Origin"] = b"*"
        self.assertEqual(to_openai_error(errors.ConcurrencyLimit("y"))[1], {b"Retry-After": b"1"})

    def test_unexpected_exception_is_500_without_details(self):
        """ERR-2: anything unexpected is 500 internal_error; nothing of it reaches the client."""
        status, headers, body = to_openai_error(KeyError("secret /etc/passwd"))
        self.assertEqual(status, 500)
        error = json.loads(body)["error"]
        self.assertEqual((error["type"], error["code"]), ("server_error", "internal_error"))
        self.assertNotIn(b"secret", body)

    def test_error_body(self):
        self.assertEqual(json.loads(error_body("t", "c", "m")),
                         {"error": {"message": "m", "type": "t", "param": None, "code": "c"}})


class ModelNotFoundHintTests(SynchronousTestCase):
    """An unknown model's 404 suggests close names and says how many models there are."""

    CONFIG = """\
models:
  chat-a: {cmd: 'srv ${PORT}'}
  chat-b: {cmd: 'srv ${PORT}', aliases: [gpt-4o-mini]}
  embed: {cmd: 'srv ${PORT}', filters: {setParamsByID: {"embed:fast": {dimensions: 256}}}}
  secret-chat: {cmd: 'srv ${PORT}', unlisted: true, aliases: [hidden-chat]}
peers:
  openrouter: {proxy: 'https://openrouter.example/api', models: [llama-70b]}
"""

    def setUp(self) -> None:
        from llamaswap.config import parse_config
        self.config = parse_config(self.CONFIG, "t.yaml", {})

    def message(self, name: str) -> str:
        return errors.ModelNotFound.named(name, self.config).message

    def test_close_names(self):
        """Listed ids (in name order when equally close); count = listed models plus peer models."""
        self.assertEqual(self.message("chat-c"), "model 'chat-c' not found; did you mean 'chat-a' or 'chat-b'? "
                                                 "(4 models are available: GET /v1/models lists them)")

    def test_aliases_are_candidates(self):
        """Aliases, setParamsByID names and peer models are suggested too."""
        self.assertIn("did you mean 'gpt-4o-mini'?", self.message("gpt-4o-mnii"))
        self.assertIn("did you mean 'embed:fast'?", self.message("embed:fats"))
        self.assertIn("did you mean 'openrouter/llama-70b'?", self.message("openrouter/llama-7b"))
        self.assertIn("did you mean 'chat-a'?", self.message("CHAT-A"))

    def test_unlisted_models_stay_hidden(self):
        """An unlisted model is neither suggested nor counted."""
        self.assertEqual(self.message("secret-chta"), "model 'secret-chta' not found "
                                                      "(4 models are available: GET /v1/models lists them)")
        self.assertNotIn("did you mean", self.message("hidden-chatt"))

    def test_counts(self):
        from llamaswap.config import parse_config
        one = parse_config("models:\n  a: {cmd: 'srv ${PORT}'}\n", "t.yaml", {})
        self.assertEqual(errors.ModelNotFound.named("zzz", one).message,
                         "model 'zzz' not found (1 model is available: GET /v1/models lists them)")
        self.assertEqual(errors.ModelNotFound.named("zzz", parse_config("", "t.yaml", {})).message,
                         "model 'zzz' not found (no models are configured)")

    def test_rendered_once_and_openai_shaped(self):
        """The hint is in the envelope's message; str() agrees; the code stays model_not_found."""
        error = errors.ModelNotFound.named("chat-c", self.config)
        status, _, body = to_openai_error(error)
        self.assertEqual(status, 404)
        self.assertEqual(json.loads(body)["error"]["code"], "model_not_found")
        self.assertEqual(json.loads(body)["error"]["message"], str(error))
        self.assertEqual(error.message, str(error))

    def test_huge_names_get_no_suggestion(self):
        self.assertEqual(errors.close_matches("a" * 201, ["a" * 200]), [])

    def test_either(self):
        self.assertEqual(errors.either(["a"]), "'a'")
        self.assertEqual(errors.either(["a", "b"]), "'a' or 'b'")
        self.assertEqual(errors.either(["a", "b", "c"]), "'a', 'b' or 'c'")
