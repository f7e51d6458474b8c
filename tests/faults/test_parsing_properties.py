"""Any request a client can send is read into a model and a path, or refused with a 4xx.

Property-based: hypothesis generates bodies and paths; nothing may raise anything but the error
tree's client errors.
"""

from __future__ import annotations

import json

import pytest
from aiohttp.test_utils import make_mocked_request
from hypothesis import given, settings
from hypothesis import strategies as st

from tcproxy.errors import ClientError
from tcproxy.incoming import find_model, upstream_target

_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=12,
)
_objects = st.dictionaries(
    st.sampled_from(["model", "prompt", "stream", "max_tokens", "api_base", "x"]), _json, max_size=5
)


@settings(max_examples=400, deadline=None)
@given(body=st.binary(max_size=300))
def test_any_bytes_give_a_model_or_a_client_error(body):
    for method in ("POST", "GET"):
        try:
            model, stream = find_model(method, body)
        except ClientError as error:
            assert error.status == 400 and error.message
            continue
        assert model is None or (isinstance(model, str) and model.isprintable())
        assert isinstance(stream, bool)


@settings(max_examples=400, deadline=None)
@given(document=_objects)
def test_any_json_object_gives_a_model_or_a_client_error(document):
    body = json.dumps(document).encode()
    try:
        model, stream = find_model("POST", body)
    except ClientError as error:
        assert error.status == 400
        return
    assert model == document["model"]
    assert stream is (document.get("stream") is True)


@settings(max_examples=300, deadline=None)
@given(document=_objects, cut=st.integers(min_value=0, max_value=80))
def test_a_broken_document_is_refused_as_the_full_parser_words_it(document, cut):
    body = json.dumps(document).encode()
    broken = body[: max(1, len(body) - cut)] if cut else body + b","
    try:
        json.loads(broken)
    except ValueError:
        with pytest.raises(ClientError) as caught:
            find_model("POST", broken)
        assert caught.value.code in ("invalid_json", "invalid_body")


def test_a_large_prompt_is_read_past_for_model_and_stream_and_still_checked_whole():
    prompt = 'a line with "quotes", \\ and a tab\t\n' * 300_000  # about 12 MB as JSON
    body = json.dumps({"model": "gpt-4", "prompt": prompt, "stream": True}).encode()
    assert len(body) > 10 * 1024 * 1024
    assert find_model("POST", body) == ("gpt-4", True)
    with pytest.raises(ClientError) as caught:
        find_model("POST", body[:-1] + b", }")
    assert caught.value.code == "invalid_json"
    assert "line 1, column" in caught.value.message


@pytest.mark.parametrize(
    "body",
    [
        b'{"model": "gpt\xff"}',
        b'{"model": "gpt-4", "stream": "\xff"}',
        b'{"model": ["\xff"]}',
        b'{"model": "gpt-4", "prompt": "\xc0\xaf"}',
        b'{"model": "gpt-4", "prompt": "\xed\xa0\x80"}',
        b'{"model": "gpt-4", "\xff": 1}',
        b'{"model": "gpt-4", "prompt": "' + "\u00e9".encode()[:1] + b'"}',
    ],
)
def test_a_body_that_is_not_utf8_is_invalid_json_wherever_the_bad_byte_is(body):
    with pytest.raises(ClientError) as caught:
        find_model("POST", body)
    assert caught.value.code == "invalid_json"


@pytest.mark.parametrize("depth", [900, 1100, 1_000_000])
def test_deep_nesting_is_read_or_refused_never_a_crash(depth):
    body = b'{"model": "gpt-4", "deep": ' + b"[" * depth + b"]" * depth + b"}"
    try:
        assert find_model("POST", body) == ("gpt-4", False)
    except ClientError as error:
        assert error.code == "invalid_json" and "depth" in error.message


_segment = st.lists(
    st.sampled_from([*"abcv1-_~eEfF/\\", "%2F", "%2e", "%00", "..", ".", "%"]), max_size=6
).map("".join)


@settings(max_examples=400, deadline=None)
@given(path=st.lists(_segment, max_size=5).map(lambda parts: "/v1/" + "/".join(parts)))
def test_any_path_gives_a_plain_target_or_a_client_error(path):
    try:
        request = make_mocked_request("GET", path)
    except ValueError:
        return  # not even a URL aiohttp would have parsed
    try:
        target = upstream_target(request)
    except ClientError as error:
        assert error.status == 400
        return
    segments = target.split("?")[0].split("/")[2:]
    assert all(segment not in ("", ".", "..") for segment in segments)
    assert target.startswith("/v1/")
