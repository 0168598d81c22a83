"""Profile pins (``profiles.<name>: {description, pins}``), ``/api/profiles``, selectors over
HTTP, and ``/v1/models`` as llama-swap HEAD shapes it.

In memory: the daemon's resource tree behind ``AccessLogSite`` (``HTTPCase`` from
test_resources), real ``UpstreamProcess`` objects on a ``FakeProcessReactor``, and one upstream
stub that every model's proxy reaches; each model has its own proxy port, so the ``Host`` an
upstream request carries says which model served it.
"""
from __future__ import annotations

import json

import attr
import pytest

from llamaswap.config import Capabilities, GroupConfig, PeerConfig, ProfileConfig, SelectorConfig
from tests.factories import make_model
from tests.test_resources import STARTED, HTTPCase

PORTS = {"real": 5801, "hidden": 5802, "a": 5803, "b": 5804}

CODING = ProfileConfig("coding", "Coding profile",
                       {"public": "variant", "disabled": None, "real": "hidden", "expose": "hidden",
                        "fast": "quick", "remote-model": "hidden"})
WRITING = ProfileConfig("writing", "", {"public": "real"})


def model(model_id: str, **kw):
    return make_model(id=model_id, proxy=f"http://127.0.0.1:{PORTS[model_id]}", **kw)


class ProfileCase(HTTPCase):
    def setUp(self) -> None:
        pair = GroupConfig("pair", swap=False, exclusive=True, members=("a", "b"))
        self.build(
            [model("real", name="Real Model", aliases=("variant",),
                   set_params_by_id={"variant": {"thinking": True}}),
             model("hidden", name="Hidden Model", unlisted=True),
             model("a"), model("b")],
            groups={"pair": pair},
            pin_profiles={"coding": CODING, "writing": WRITING},
            selectors={"quick": SelectorConfig("quick", "warm", ("a", "b"), name="Quick", description="warmest"),
                       "spill": SelectorConfig("spill", "spillover", ("a", "b"), spillover=1),
                       "secret": SelectorConfig("secret", "pin", ("b",), unlisted=True)},
            peers={"remote": PeerConfig("remote", "http://127.0.0.1:9", models=("remote-model",))})

    def chat(self, name: str, extra: bytes = b""):
        return self.call(b"POST", "/v1/chat/completions", b'{"model":"%s"%s}' % (name.encode(), extra))

    def served_by(self) -> str:
        """The model whose proxy the last upstream request went to."""
        request, _ = self.upstream.requests[-1]
        port = int(request.getHeader(b"host").rsplit(b":", 1)[1])
        return {p: m for m, p in PORTS.items()}[port]

    def activate(self, name) -> tuple:
        return self.call_json(b"PUT", "/api/profiles/active", json.dumps({"name": name}).encode())


class PinTests(ProfileCase):
    def test_no_profile_is_active_at_first(self):
        response, data = self.chat("public")
        self.assertError(response, data, 404, "model_not_found")
        self.chat("real")
        self.assertEqual(self.served_by(), "real")

    def test_pinned_id_goes_to_its_target_before_aliases_and_filters(self):
        """``public`` -> ``variant`` (an alias of real whose setParamsByID applies); ``real`` ->
        hidden: a pin wins over the model id it shadows."""
        response, body = self.activate("coding")
        self.assertEqual((response.code, body), (200, {"active": "coding"}))
        response, _ = self.chat("public")
        self.assertEqual(response.code, 200)
        self.assertEqual(self.served_by(), "real")
        sent = json.loads(self.upstream.requests[-1][1])
        self.assertIs(sent["thinking"], True)
        self.chat("real")
        self.assertEqual(self.served_by(), "hidden")
        self.chat("hidden")
        self.assertEqual(self.served_by(), "hidden")

    def test_pin_wins_over_a_peer_model(self):
        self.activate("coding")
        self.chat("remote-model")
        self.assertEqual(self.served_by(), "hidden")

    def test_pin_to_nothing_is_a_404(self):
        self.activate("coding")
        response, data = self.chat("disabled")
        message = self.assertError(response, data, 404, "model_not_found")
        self.assertEqual(message, "model 'disabled' is disabled by the active profile 'coding'")

    def test_pin_to_a_selector(self):
        """``fast`` -> the warm selector ``quick``: with b ready, b."""
        self.activate("coding")
        self.chat("b")
        self.chat("fast")
        self.assertEqual(self.served_by(), "b")

    def test_switching_and_deactivating(self):
        self.activate("writing")
        self.chat("public")
        self.assertEqual(self.served_by(), "real")
        self.chat("real")
        self.assertEqual(self.served_by(), "real")  # writing does not pin real
        response, body = self.activate(None)
        self.assertEqual((response.code, body), (200, {"active": None}))
        response, data = self.chat("public")
        self.assertError(response, data, 404, "model_not_found")
        self.activate("coding")
        response, body = self.call_json(b"PUT", "/api/profiles/active", b'{"name": ""}')
        self.assertEqual(body, {"active": None})
        self.assertIsNone(self.router.active_profile)

    def test_upstream_applies_pins(self):
        self.activate("coding")
        response, _ = self.call(b"POST", "/upstream/public/custom/path?x=1", b'{"model":"public"}')
        self.assertEqual(response.code, 200)
        self.assertEqual(self.served_by(), "real")
        request, body = self.upstream.requests[-1]
        self.assertEqual((request.uri, body), (b"/custom/path?x=1", b'{"model":"public"}'))

    def test_reload_deactivates(self):
        self.activate("coding")
        self.router.reconfigure(attr.evolve(self.config))
        self.assertIsNone(self.router.active_profile)
        _, body = self.call_json(b"GET", "/api/profiles")
        self.assertIsNone(body["active"])


class ProfileAPITests(ProfileCase):
    def test_list(self):
        response, body = self.call_json(b"GET", "/api/profiles")
        self.assertEqual(response.code, 200)
        self.assertEqual(self.header(response, b"content-type"), b"application/json")
        self.assertEqual(body, {"active": None, "profiles": [
            {"id": "coding", "description": "Coding profile",
             "pins": {"public": "variant", "disabled": "", "real": "hidden", "expose": "hidden",
                      "fast": "quick", "remote-model": "hidden"}},
            {"id": "writing", "description": "", "pins": {"public": "real"}}]})
        self.activate("writing")
        _, body = self.call_json(b"GET", "/api/profiles")
        self.assertEqual(body["active"], "writing")

    def test_unknown_profile_is_a_404_and_keeps_the_active_one(self):
        self.activate("coding")
        response, data = self.call(b"PUT", "/api/profiles/active", b'{"name":"missing"}')
        message = self.assertError(response, data, 404, "profile_not_found")
        self.assertEqual(message, "profile 'missing' not found; the profiles are coding, writing")
        self.assertEqual(self.router.active_profile, "coding")

    def test_bad_bodies(self):
        for body, code, words in ((b"{", "invalid_json", "invalid JSON"),
                                  (b'["coding"]', "invalid_profile_request", "JSON object"),
                                  (b"{}", "invalid_profile_request", "profile name is required"),
                                  (b'{"name": 3}', "invalid_profile_request", "string or null")):
            response, data = self.call(b"PUT", "/api/profiles/active", body)
            message = self.assertError(response, data, 400, code)
            self.assertIn(words, message)
        self.assertIsNone(self.router.active_profile)

    def test_methods(self):
        response, data = self.call(b"GET", "/api/profiles/active")
        self.assertError(response, data, 405, "method_not_allowed")
        self.assertEqual(self.header(response, b"allow"), b"PUT, OPTIONS")
        response, data = self.call(b"PUT", "/api/profiles", b'{"name":"coding"}')
        self.assertError(response, data, 405, "method_not_allowed")
        response, data = self.call(b"GET", "/api/profiles/other")
        self.assertError(response, data, 404, "not_found")


class SelectorHTTPTests(ProfileCase):
    def test_warm_selector_is_served_by_the_ready_target(self):
        self.chat("quick")
        self.assertEqual(self.served_by(), "a")  # nothing ready: a cold start of the first
        self.router.unload(["a"])
        self.chat("b")
        self.chat("quick")
        self.assertEqual(self.served_by(), "b")

    def test_spillover_selector_spills_to_the_second_target(self):
        self.upstream.hold = True
        first = self.request(b"POST", "/v1/chat/completions", b'{"model":"spill"}')
        second = self.request(b"POST", "/v1/chat/completions", b'{"model":"spill"}')
        hosts = [r.getHeader(b"host") for r, _ in self.upstream.requests]
        self.assertEqual(hosts, [b"127.0.0.1:5803", b"127.0.0.1:5804"])
        for request, _ in self.upstream.requests:
            request.finish()
        self.flush()
        self.assertEqual([self.successResultOf(d).code for d in (first, second)], [200, 200])

    def test_record_names_the_chosen_model(self):
        records = []
        self.rewire(request_listeners=(records.append,))
        self.chat("quick")
        self.assertEqual([r.model for r in records], ["a"])

    def test_upstream_refuses_selectors(self):
        response, data = self.call(b"GET", "/upstream/quick/health")
        message = self.assertError(response, data, 404, "model_not_found")
        self.assertEqual(message, "'quick' is a selector, which /upstream does not take; "
                                  "use one of its targets (a, b)")
        self.activate("coding")
        response, data = self.call(b"GET", "/upstream/fast/health")  # a pin to a selector
        self.assertError(response, data, 404, "model_not_found")
        self.assertEqual(self.upstream.requests, [])
        self.call(b"GET", "/upstream/a/health")
        self.assertEqual(self.served_by(), "a")


class ModelListTests(ProfileCase):
    def listing(self) -> dict:
        _, body = self.call_json(b"GET", "/v1/models")
        return {e["id"]: e for e in body["data"]}

    def test_everything_sorted_by_id_with_types(self):
        _, body = self.call_json(b"GET", "/v1/models")
        self.assertEqual([e["id"] for e in body["data"]], ["a", "b", "quick", "real", "remote/remote-model",
                                                           "spill"])
        by_id = {e["id"]: e for e in body["data"]}
        self.assertEqual(by_id["a"], {"id": "a", "object": "model", "created": STARTED, "owned_by": "llama-swap",
                                      "meta": {"llamaswap": {"type": "model"}}, "status": {"value": "unloaded"}})
        self.assertEqual(by_id["real"]["meta"], {"llamaswap": {"type": "model", "aliases": ["variant"]}})
        self.assertEqual(by_id["remote/remote-model"], {
            "id": "remote/remote-model", "object": "model", "created": STARTED, "owned_by": "llama-swap",
            "name": "remote: remote-model", "meta": {"llamaswap": {"type": "peer", "peerID": "remote"}},
            "status": {"value": "unloaded"}})

    def test_selectors(self):
        by_id = self.listing()
        self.assertNotIn("secret", by_id)  # unlisted
        self.assertEqual(by_id["quick"], {
            "id": "quick", "object": "model", "created": STARTED, "owned_by": "llama-swap", "name": "Quick",
            "description": "warmest",
            "meta": {"llamaswap": {"type": "selector", "strategy": "warm", "targets": ["a", "b"]}},
            "status": {"value": "unloaded"}})
        self.assertEqual(by_id["spill"]["meta"]["llamaswap"],
                         {"type": "selector", "strategy": "spillover", "targets": ["a", "b"], "spillover": 1})
        self.chat("b")
        by_id = self.listing()
        self.assertEqual(by_id["quick"]["status"], {"value": "loaded"})
        self.assertEqual(by_id["b"]["status"], {"value": "loaded"})

    def test_active_profile_pins_are_listed_unless_they_shadow_a_name(self):
        self.activate("coding")
        by_id = self.listing()
        # public, expose and fast name nothing else; real, remote-model do; disabled pins to nothing
        for pin in ("public", "expose", "fast"):
            self.assertEqual(by_id[pin], {"id": pin, "object": "model", "created": STARTED,
                                          "owned_by": "llama-swap", "meta": {"llamaswap": {"type": "profile"}},
                                          "status": {"value": "unloaded"}})
        self.assertNotIn("disabled", by_id)
        self.assertNotIn("hidden", by_id)
        self.assertEqual(by_id["real"]["name"], "Real Model")
        self.assertNotIn("remote-model", by_id)

    def test_capabilities(self):
        caps = Capabilities(input=("text", "image"), output=("text",), tools=True, context=32768)
        self.change_config(models={**self.config.models, "a": attr.evolve(
            self.config.models["a"], capabilities=caps,
            metadata={"family": "x", "capabilities": "dropped", "context_length": 1})})
        entry = self.listing()["a"]
        self.assertEqual(entry["architecture"], {"input_modalities": ["text", "image"],
                                                 "output_modalities": ["text"], "modality": "text+image->text"})
        self.assertEqual(entry["capabilities"], {"vision": True, "function_calling": True})
        self.assertEqual(entry["supported_parameters"], ["tools", "tool_choice"])
        self.assertEqual(entry["context_length"], 32768)
        self.assertEqual(entry["meta"], {"llamaswap": {"family": "x", "type": "model"}, "n_ctx": 32768})
        self.assertEqual(list(entry), ["id", "object", "created", "owned_by", "architecture", "capabilities",
                                       "supported_parameters", "context_length", "meta", "status"])

    def test_capability_flags(self):
        cases = [
            (Capabilities(input=("audio",), output=("text",)), {"audio_transcriptions": True}),
            (Capabilities(input=("text",), output=("audio",)), {"audio_speech": True}),
            (Capabilities(input=("text",), output=("image",)), {"image_generation": True}),
            (Capabilities(input=("image",), output=("image",)), {"vision": True, "image_to_image": True}),
            (Capabilities(reranker=True), {"reranker": True}),
            (Capabilities(input=("text",), output=("text",)), None),
            (Capabilities(context=4096), None),
        ]
        for caps, flags in cases:
            self.change_config(models={**self.config.models, "a": attr.evolve(self.config.models["a"],
                                                                             capabilities=caps)})
            self.assertEqual(self.listing()["a"].get("capabilities"), flags, caps)

    def test_aliases_interleaved_when_listed(self):
        """With includeAliasesInList every id is sorted together, aliases among the models."""
        self.build([make_model(id="b", aliases=("zz", "a2"), metadata={"family": "x"}), make_model(id="a"),
                    make_model(id="c")], include_aliases_in_list=True)
        _, body = self.call_json(b"GET", "/v1/models")
        self.assertEqual([e["id"] for e in body["data"]], ["a", "a2", "b", "c", "zz"])
        a2 = body["data"][1]
        self.assertEqual(a2["meta"], {"llamaswap": {"family": "x", "type": "alias", "modelID": "b"}})



# -- what needs the dispatcher's help --------------------------------------------------------

from tests.test_peers import PeerCase  # noqa: E402  (kept beside the tests that use it)

PEER = PeerConfig("p1", "http://peer-one.example", "", ("m1",))

#: the inference dispatcher (llamaswap.web.dispatch) looks a peer up by the name the client sent,
#: and sends that name upstream; with pins and selectors it must use ``router.rewrite(name)``


class PeerTargetTests(PeerCase):
    def setUp(self) -> None:
        self.build_peers({"p1": PEER}, models=[make_model(id="local", aliases=("variant",))],
                         pin_profiles={"coding": ProfileConfig("coding", "", {"chat": "p1/m1", "v": "variant"})},
                         selectors={"spill": SelectorConfig("spill", "spillover", ("local", "p1/m1"))})

    def test_pin_to_a_peer_model(self):
        self.router.set_active_profile("coding")
        response, data = self.call(b"POST", "/v1/chat/completions", b'{"model":"chat"}')
        self.assertEqual((response.code, data), (200, b'{"from":"peer"}'))
        self.assertEqual(json.loads(self.peer.requests[0][1]), {"model": "m1"})

    def test_spillover_to_a_peer_model(self):
        self.upstream.hold = True
        self.request(b"POST", "/v1/chat/completions", b'{"model":"spill"}')
        response, data = self.call(b"POST", "/v1/chat/completions", b'{"model":"spill"}')
        self.assertEqual((response.code, data), (200, b'{"from":"peer"}'))
        self.upstream.requests[0][0].finish()
        self.flush()

    def test_pinned_request_goes_upstream_under_the_target_name(self):
        """llama-swap rewrites the body's model to the pin's target."""
        self.router.set_active_profile("coding")
        self.call(b"POST", "/v1/chat/completions", b'{"model":"v"}')
        self.assertEqual(json.loads(self.upstream.requests[0][1]), {"model": "variant"})
