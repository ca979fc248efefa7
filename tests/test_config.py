"""Configuration: defaults, precedence, the example file, and one-line errors naming the field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from core.config import Config, ConfigError, example_config, load_config

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_are_the_products() -> None:
    c = Config()
    assert c.service.gateway_port == 8006
    assert c.service.worker_base_port == 22400
    assert c.service.max_queue_size == 1000
    assert c.service.request_timeout == 300
    assert c.model.compile is False
    assert c.service.data_dir == "data"
    assert (c.service.eta_chat_s, c.service.eta_streaming_s, c.service.eta_audio_duplex_s) == (15, 20, 120)
    assert (c.service.eta_ema_alpha, c.service.eta_ema_min_samples) == (0.3, 3)
    assert c.duplex.pause_timeout == 60
    assert c.audio.playback_delay_ms == 200
    assert c.model.attn_implementation == "auto"


def test_example_file_lists_every_field_with_its_default() -> None:
    assert json.loads((ROOT / "config.example.json").read_text()) == example_config()


def test_precedence_cli_over_file_over_defaults(tmp_path: Path) -> None:
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"service": {"gateway_port": 9000, "max_queue_size": 5}}))
    c = load_config(f, {"service": {"gateway_port": 9100, "max_queue_size": None}})
    assert c.service.gateway_port == 9100  # CLI wins
    assert c.service.max_queue_size == 5  # file wins over default; an unset flag does not mask it
    assert c.service.request_timeout == 300  # default


def test_example_file_loads_as_a_config(tmp_path: Path) -> None:
    assert load_config(ROOT / "config.example.json") == Config()


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        ({"service": {"gatway_port": 1}}, "unknown key 'service.gatway_port'"),
        ({"servce": {}}, "unknown key 'servce'"),
        ({"service": {"gateway_port": "abc"}}, "service.gateway_port"),
        ({"service": {"gateway_port": 70000}}, "service.gateway_port"),
        ({"duplex": {"pause_timeout": -1}}, "duplex.pause_timeout"),
        ({"model": {"stack": "gpu"}}, "model.stack"),
        ([1, 2], "top level must be a JSON object"),
    ],
)
def test_bad_values_are_one_line_errors_naming_the_field(
    tmp_path: Path, content: object, needle: str
) -> None:
    f = tmp_path / "c.json"
    f.write_text(json.dumps(content))
    with pytest.raises(ConfigError) as err:
        load_config(f)
    assert needle in str(err.value)
    assert "\n" not in str(err.value)


def test_bad_json_and_missing_file(tmp_path: Path) -> None:
    f = tmp_path / "c.json"
    f.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(f)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "absent.json")


def test_bad_cli_override_names_the_field() -> None:
    with pytest.raises(ConfigError, match=r"command line: service.gateway_port"):
        load_config(None, {"service": {"gateway_port": 0}})
