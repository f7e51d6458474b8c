"""The config loader: typed values, and every problem reported with its key path and line."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tcproxy.config import Config, ConfigInvalid, load_config, parse_config
from tcproxy.config.model import DOCUMENTED_RPM

ROOT = Path(__file__).resolve().parent.parent


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigInvalid) as caught:
        parse_config(text, source="c.yaml")
    return [str(p) for p in caught.value.problems]


def test_example_config_is_valid_and_documents_the_defaults():
    config = load_config(ROOT / "config.example.yaml")
    assert config == Config()
    assert {m: lim.rpm for m, lim in config.limits.models.items()} == dict(DOCUMENTED_RPM)


def test_empty_file_means_all_defaults():
    assert parse_config("") == Config()
    assert parse_config("# only a comment\n") == Config()


def test_values_are_typed_and_immutable():
    config = parse_config(
        "limits:\n  models:\n    gpt-4: 100\n    x: {rpm: 5, burst: 2}\n"
        "server:\n  max_body_size: 1MiB\n"
    )
    assert config.limits.for_model("gpt-4").rpm == 100
    assert config.limits.for_model("x").burst == 2
    assert config.limits.for_model("unlisted") == config.limits.default
    assert config.server.max_body_size == 1024 * 1024
    with pytest.raises(AttributeError):
        config.limits.queue_timeout = 1  # type: ignore[misc]
    with pytest.raises(TypeError):
        config.limits.models["y"] = None  # type: ignore[index]


def test_every_problem_is_reported_with_key_path_and_line():
    found = problems(
        "listen: 127.0.0.1\n"  # 1
        "upstrem: {}\n"  # 2
        "limits:\n"  # 3
        "  models:\n"  # 4
        "    gpt-4: {rpm: -5, burts: 3}\n"  # 5
        "    claude-2: yes\n"  # 6
        "  queue_timeout: soon\n"  # 7
        "server:\n"  # 8
        "  max_body_size: 10TB\n"  # 9
        "log: {level: loud}\n"  # 10
    )
    expected = [
        "line 1: listen: must be HOST:PORT",
        "line 2: upstrem: unknown key; did you mean 'upstream'?",
        "line 5: limits.models.gpt-4.burts: unknown key; did you mean 'burst'?",
        "line 5: limits.models.gpt-4.rpm: must be a whole number",
        "line 6: limits.models.claude-2: must be {rpm: N}",
        "line 7: limits.queue_timeout: must be a number, got text",
        "line 9: server.max_body_size: must be a size like 32MiB",
        "line 10: log.level: must be one of debug, info, warning, error",
    ]
    assert len(found) == len(expected)
    for line, prefix in zip(found, expected, strict=True):
        assert line.startswith(prefix), (line, prefix)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("limits: [1, 2]", "limits: must be a mapping of keys, got a list"),
        ("limits:\n  models:\n    gpt-4: {}\n", "needs 'rpm'"),
        ("limits:\n  models:\n    gpt-4: {rpm: 1.5}\n", "must be a whole number, got a number"),
        ("limits:\n  models:\n    gpt-4: {rpm: 10, burst: 0.5}\n", "burst: must be 1 or more"),
        ("limits:\n  max_queue: 0\n", "max_queue: must be 1 or more"),
        ("limits:\n  safety_margin: -1\n", "between 0 and 10 seconds"),
        ("upstream:\n  base_url: ftp://x\n", "must be an http:// or https:// URL"),
        ("upstream:\n  base_url: https://u:p@x\n", "must not carry"),
        ("upstream:\n  token_env: 'A B'\n", "environment variable name"),
        ("upstream:\n  connect_timeout: 0\n", "above 0"),
        ("upstream:\n  read_timeout: .inf\n", "finite"),
        ("listen: 127.0.0.1:70000\n", "port must be 0-65535"),
        ("listen: 0.0.0.0:8787\n", "reachable from the network"),
        ("listen: '[::]:8787'\n", "reachable from the network"),
        ("a: 1\na: 2\n", "appears twice"),
        ("limits: {models: {gpt-4: 5}}\nlimits: {}\n", "appears twice"),
        ("1: x\n", "keys must be text"),
        ("listen: [\n", "not valid YAML"),
        ("\tlisten: x\n", "not valid YAML"),
        ("just text\n", "must be a mapping of keys"),
    ],
)
def test_problems_say_what_to_fix(text, message):
    assert any(message in p for p in problems(text)), problems(text)


def test_yaml_syntax_error_has_a_line():
    (found,) = problems("listen: 127.0.0.1:8787\nlimits:\n  models: {gpt-4: {rpm: 5}\n")
    assert found.startswith("line ")


def test_loopback_listen_addresses_are_accepted():
    for address in ("127.0.0.1:1", "localhost:8787", "[::1]:8787", "127.0.0.2:9"):
        parse_config(f"listen: '{address}'\n")


def test_missing_file_is_a_clear_problem(tmp_path):
    with pytest.raises(ConfigInvalid) as caught:
        load_config(tmp_path / "nope.yaml")
    assert "cannot read" in caught.value.render()


_yaml_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), st.text(max_size=20)
)
_yaml_values = st.recursive(
    _yaml_scalars,
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(
            st.sampled_from(["rpm", "burst", "models", "gpt-4", "x", "level"]), inner, max_size=3
        )
    ),
    max_leaves=10,
)
_sections = st.dictionaries(
    st.sampled_from(["listen", "upstream", "limits", "server", "log", "other"]),
    _yaml_values,
    max_size=5,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tree=_sections)
def test_any_structure_gives_a_config_or_a_clear_error(tree):
    import yaml

    try:
        parse_config(yaml.safe_dump(tree))
    except ConfigInvalid as exc:
        assert exc.problems and all(str(p) for p in exc.problems)


@settings(max_examples=300, deadline=None)
@given(text=st.text(max_size=200))
def test_any_text_gives_a_config_or_a_clear_error(text):
    try:
        parse_config(text)
    except ConfigInvalid as exc:
        assert exc.problems
