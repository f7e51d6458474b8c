"""Where the upstream token comes from, and that it cannot be printed by accident."""

from __future__ import annotations

import pickle

import pytest

from tcproxy.config import Secret, TokenError, UpstreamConfig, resolve_token

TOKEN = "tc-live-abcdef0123456789"


def test_secret_never_prints():
    secret = Secret(TOKEN)
    texts = (repr(secret), str(secret), f"{secret}", f"{secret!r}", "%s" % (secret,))  # noqa: UP031
    for text in texts:
        assert TOKEN not in text
    assert TOKEN not in repr({"token": secret, "nested": [secret]})
    with pytest.raises(TypeError):
        pickle.dumps(secret)
    assert secret.reveal() == TOKEN


def test_from_environment_by_default():
    resolved = resolve_token(UpstreamConfig(), {"TOKENCHEAP_API_KEY": TOKEN})
    assert resolved.secret.reveal() == TOKEN
    assert resolved.source == "environment variable TOKENCHEAP_API_KEY"


def test_named_environment_variable():
    resolved = resolve_token(UpstreamConfig(token_env="MY_KEY"), {"MY_KEY": f"  {TOKEN}\n"})
    assert resolved.secret.reveal() == TOKEN


def test_token_file_wins_and_trailing_crlf_is_dropped(tmp_path):
    path = tmp_path / "token"
    path.write_bytes(TOKEN.encode() + b"\r\n")
    path.chmod(0o600)
    resolved = resolve_token(
        UpstreamConfig(token_file=str(path)),
        {"TOKENCHEAP_API_KEY": "other", "CREDENTIALS_DIRECTORY": str(tmp_path)},
    )
    assert resolved.secret.reveal() == TOKEN
    assert resolved.warnings == []


def test_systemd_credential_before_environment(tmp_path):
    (tmp_path / "tokencheap").write_text(TOKEN + "\n")
    (tmp_path / "tokencheap").chmod(0o400)
    env = {"CREDENTIALS_DIRECTORY": str(tmp_path), "TOKENCHEAP_API_KEY": "from-env"}
    resolved = resolve_token(UpstreamConfig(), env)
    assert resolved.secret.reveal() == TOKEN
    assert "systemd credential" in resolved.source


def test_file_readable_by_others_gets_a_warning(tmp_path):
    path = tmp_path / "token"
    path.write_text(TOKEN)
    path.chmod(0o644)
    resolved = resolve_token(UpstreamConfig(token_file=str(path)), {})
    (warning,) = resolved.warnings
    assert "chmod 600" in warning and TOKEN not in warning


def test_missing_token_says_where_it_looked():
    with pytest.raises(TokenError) as caught:
        resolve_token(UpstreamConfig(), {})
    message = str(caught.value)
    assert "TOKENCHEAP_API_KEY (not set)" in message
    assert "CREDENTIALS_DIRECTORY" in message
    assert "upstream.token_file" in message


@pytest.mark.parametrize("content", ["", "   \n", "\r\n"])
def test_empty_token_is_an_error(tmp_path, content):
    path = tmp_path / "token"
    path.write_text(content)
    with pytest.raises(TokenError, match="is empty"):
        resolve_token(UpstreamConfig(token_file=str(path)), {})
    with pytest.raises(TokenError, match="is empty"):
        resolve_token(UpstreamConfig(), {"TOKENCHEAP_API_KEY": content})


def test_missing_token_file_is_an_error(tmp_path):
    with pytest.raises(TokenError, match="No such file"):
        resolve_token(UpstreamConfig(token_file=str(tmp_path / "absent")), {})


@pytest.mark.parametrize("bad", ["two words", "tab\there", "new\nline", "caf\u00e9"])
def test_token_that_cannot_go_in_a_header_is_refused_without_echoing_it(bad):
    with pytest.raises(TokenError) as caught:
        resolve_token(UpstreamConfig(), {"TOKENCHEAP_API_KEY": bad})
    assert bad not in str(caught.value)
