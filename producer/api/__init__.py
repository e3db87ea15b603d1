"""The HTTP API: OpenAI-compatible completions and chat, native jobs, health and metrics."""
from producer.api.app import create_app
from producer.api.settings import ApiSettings, SettingsError

__all__ = ["ApiSettings", "SettingsError", "create_app"]
