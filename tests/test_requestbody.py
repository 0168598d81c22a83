"""Request bodies: JSON model extraction (RT-1), filters (RT-9/RT-10), multipart scanning."""
from __future__ import annotations

import io
import json

from twisted.trial.unittest import SynchronousTestCase

from llamaswap import requestbody
from llamaswap.errors import InvalidJSON, InvalidMultipart
from llamaswap.requestbody import (
    apply_filters, find_form_field, multipart_boundary, parse_json_body)
from tests.factories import make_model

BOUNDARY = b"----llamaswapBoundary7MA4YWxk"


def multipart(parts: list[tuple[bytes, bytes, bytes]], boundary: bytes = BOUNDARY) -> bytes:
    """parts: (name, extra headers, value)."""
    out = b""
    for name, extra, value in parts:
        out += b"--" + boundary + b"\r\n"
        out += b'Content-Disposition: form-data; name="' + name + b'"' + extra + b"\r\n"
        out += b"\r\n" + value + b"\r\n"
    return out + b"--" + boundary + b"--\r\n"


class ParseJSONTests(SynchronousTestCase):
    def test_object_parsed(self):
        """RT-1: a JSON object; model and stream read from it."""
        body = parse_json_body(b'{"model": "a", "stream": true}')
        self.assertEqual(body.model, "a")
        self.assertTrue(body.stream)

    def test_stream_only_when_true(self):
        """RT-1: only `true` marks streaming."""
        self.assertFalse(parse_json_body(b'{"stream": "yes"}').stream)
        self.assertFalse(parse_json_body(b'{"stream": 1}').stream)

    def test_invalid_json(self):
        """RT-1: not JSON -> invalid_json with the parser detail."""
        e = self.assertRaises(InvalidJSON, parse_json_body, b'{"model": ')
        self.assertTrue(e.message.startswith("invalid JSON body: "))
        self.assertEqual((e.status, e.code), (400, "invalid_json"))

    def test_not_an_object(self):
        """RT-1: a JSON array or scalar is invalid_json too."""
        for raw in (b"[1]", b'"a"', b"3", b"null"):
            self.assertRaises(InvalidJSON, parse_json_body, raw)

    def test_invalid_utf8(self):
        self.assertRaises(InvalidJSON, parse_json_body, b'{"model": "\xff"}')


class FilterTests(SynchronousTestCase):
    def filt(self, raw: bytes, requested: str = "a", upstream_model=None, **model_kw) -> bytes:
        model = make_model(id="a", **model_kw)
        return apply_filters(parse_json_body(raw), model, requested, upstream_model)

    def test_unchanged_body_byte_for_byte(self):
        """RT-10: a body that no filter changed is forwarded byte-for-byte."""
        raw = b'{ "model" : "a",\n  "x": 1.50, "u": "\\u00e9" }'
        self.assertIs(self.filt(raw), raw)
        self.assertIs(self.filt(raw, set_params={"x": 1.5}), raw)  # same value: unchanged
        self.assertIs(self.filt(raw, strip_params=("absent",)), raw)

    def test_nothing_to_apply_reads_no_json(self):
        """Without filters, and with the model already named as upstream wants it, the body is
        sent as received without being decoded again (the usual request costs no JSON work)."""
        raw = b'{"model": "a", "x": [1, 2]}'
        body = parse_json_body(raw)
        model = make_model(id="a")

        def no_json(*args, **kw):
            raise AssertionError("the body was decoded again")

        self.patch(requestbody.json, "loads", no_json)
        self.patch(requestbody.json, "dumps", no_json)
        self.assertIs(apply_filters(body, model, "a", None), raw)
        self.assertIs(apply_filters(body, model, "a", "a"), raw)
        self.assertRaises(AssertionError, apply_filters, body, model, "a", "other")  # a change: decoded

    def test_use_model_name(self):
        """RT-8: the model sent upstream is replaced; compact UTF-8, key order kept."""
        out = self.filt(b'{"z": 1, "model": "a", "msg": "\\u00e9"}', upstream_model="real")
        self.assertEqual(out, '{"z":1,"model":"real","msg":"é"}'.encode("utf-8"))

    def test_strip_params(self):
        """RT-9 (2): each listed key is removed."""
        out = self.filt(b'{"model":"a","top_k":5,"mirostat":1,"keep":true}',
                        strip_params=("top_k", "mirostat"))
        self.assertEqual(json.loads(out), {"model": "a", "keep": True})

    def test_strip_dotted(self):
        out = self.filt(b'{"model":"a","o":{"x":1,"y":2}}', strip_params=("o.x",))
        self.assertEqual(json.loads(out), {"model": "a", "o": {"y": 2}})

    def test_set_params_dotted_creates_objects(self):
        """RT-9 (3): a.b names field b of object a; intermediate objects are created."""
        out = self.filt(b'{"model":"a"}',
                        set_params={"chat_template_kwargs.enable_thinking": False, "temperature": 0.2})
        self.assertEqual(json.loads(out), {"model": "a", "chat_template_kwargs": {"enable_thinking": False},
                                           "temperature": 0.2})

    def test_set_params_replaces_non_object_in_the_way(self):
        out = self.filt(b'{"model":"a","a":5}', set_params={"a.b": 1})
        self.assertEqual(json.loads(out)["a"], {"b": 1})

    def test_set_params_merges_into_existing_object(self):
        out = self.filt(b'{"model":"a","a":{"keep":1}}', set_params={"a.b": 1})
        self.assertEqual(json.loads(out)["a"], {"keep": 1, "b": 1})

    def test_escaped_dot_is_literal(self):
        r"""RT-9: `\.` is a literal dot."""
        out = self.filt(b'{"model":"a"}', set_params={r"qwen2\.5.x": 1})
        self.assertEqual(json.loads(out), {"model": "a", "qwen2.5": {"x": 1}})

    def test_set_params_sorted_order(self):
        """RT-9 (3): setParams apply in sorted key order (a later, deeper key wins)."""
        out = self.filt(b'{"model":"a"}', set_params={"o.x": 1, "o": {"y": 2}})
        self.assertEqual(json.loads(out)["o"], {"y": 2, "x": 1})

    def test_set_params_by_id(self):
        """RT-9 (4): setParamsByID[<requested name>] applies after setParams."""
        by_id = {"a:creative": {"temperature": 1.1}, "a": {"temperature": 0.1}}
        out = self.filt(b'{"model":"a:creative"}', requested="a:creative",
                        set_params={"temperature": 0.5}, set_params_by_id=by_id)
        self.assertEqual(json.loads(out)["temperature"], 1.1)
        out = self.filt(b'{"model":"other"}', requested="other",
                        set_params={"temperature": 0.5}, set_params_by_id=by_id)
        self.assertEqual(json.loads(out)["temperature"], 0.5)

    def test_model_protected(self):
        """RT-9: stripping or setting `model` has no effect."""
        raw = b'{"model":"a","x":1}'
        self.assertIs(self.filt(raw, strip_params=("model",)), raw)
        self.assertIs(self.filt(raw, set_params={"model": "evil"}), raw)
        self.assertIs(self.filt(raw, requested="a", set_params_by_id={"a": {"model": "evil"}}), raw)

    def test_order_use_model_name_then_filters(self):
        """RT-9: (1) useModelName, (2) strip, (3) set, (4) setParamsByID."""
        out = self.filt(b'{"model":"alias","a":1,"b":1}', requested="alias", upstream_model="real",
                        strip_params=("a",), set_params={"b": 2}, set_params_by_id={"alias": {"b": 3}})
        self.assertEqual(json.loads(out), {"model": "real", "b": 3})


class MultipartTests(SynchronousTestCase):
    def test_boundary(self):
        self.assertEqual(multipart_boundary(b"multipart/form-data; boundary=abc"), b"abc")
        self.assertEqual(multipart_boundary(b'Multipart/Form-Data; boundary="a b;c"'), b"a b;c")
        self.assertIsNone(multipart_boundary(b"application/json"))
        self.assertIsNone(multipart_boundary(b""))

    def test_missing_boundary_is_invalid_multipart(self):
        e = self.assertRaises(InvalidMultipart, multipart_boundary, b"multipart/form-data")
        self.assertEqual((e.status, e.code), (400, "invalid_multipart"))

    def test_find_model_field(self):
        """RT-1: the `model` form field, with its exact position in the body."""
        body = multipart([(b"file", b'; filename="a.wav"', b"\x00\x01RIFF--" + BOUNDARY[:5]),
                          (b"model", b"", b"whisper"), (b"language", b"", b"en")])
        field = find_form_field(io.BytesIO(body), len(body), BOUNDARY, b"model")
        self.assertEqual(field.value, b"whisper")
        self.assertEqual(body[field.start:field.end], b"whisper")

    def test_field_absent(self):
        body = multipart([(b"file", b"", b"data")])
        self.assertIsNone(find_form_field(io.BytesIO(body), len(body), BOUNDARY, b"model"))

    def test_unquoted_name(self):
        body = (b"--" + BOUNDARY + b"\r\nContent-Disposition: form-data; name=model\r\n\r\nm1\r\n--"
                + BOUNDARY + b"--\r\n")
        self.assertEqual(find_form_field(io.BytesIO(body), len(body), BOUNDARY, b"model").value, b"m1")

    def test_large_file_part_spanning_chunks(self):
        """The scan works on a spooled body larger than its read chunk."""
        big = b"x" * (200 * 1024)
        body = multipart([(b"file", b"", big), (b"model", b"", b"m")])
        field = find_form_field(io.BytesIO(body), len(body), BOUNDARY, b"model")
        self.assertEqual(field.value, b"m")
        self.assertEqual(body[field.start:field.end], b"m")

    def test_malformed_bodies(self):
        """RT-1: malformed multipart -> invalid_multipart."""
        good = multipart([(b"model", b"", b"m")])
        for body in (b"", b"garbage", good[:-(len(BOUNDARY) + 6)],
                     b"--" + BOUNDARY + b"\r\nno header end" + b"\r\n--" + BOUNDARY + b"--\r\n"):
            self.assertRaises(InvalidMultipart, find_form_field, io.BytesIO(body), len(body),
                              BOUNDARY, b"model")
