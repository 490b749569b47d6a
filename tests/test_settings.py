"""Configuration: every setting is documented in .env.example, and nonsense is refused."""

from pathlib import Path


from shared.settings import Settings

ENV_EXAMPLE = Path(__file__).resolve().parents[1] / ".env.example"


def documented_settings() -> dict[str, str]:
    lines = ENV_EXAMPLE.read_text().splitlines()
    pairs = (line.split("=", 1) for line in lines if line.startswith("ORDERFLOW_"))
    return {name: value for name, value in pairs}


def test_env_example_lists_every_setting_with_its_default() -> None:
    documented = documented_settings()
    defaults = Settings(_env_file=None)
    for name in Settings.model_fields:
        key = f"ORDERFLOW_{name.upper()}"
        assert key in documented, f"{key} is missing from .env.example"
        parsed = Settings(_env_file=None, **{name: documented[key]})
        assert getattr(parsed, name) == getattr(defaults, name), f"{key} in .env.example is not the default"
    assert len(documented) == len(Settings.model_fields)
