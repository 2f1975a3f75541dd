"""Import ``module:attribute`` as an App, with one clear error line when it cannot."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

from consumer.app import App
from consumer.errors import ConfigError


def load_app(spec: str) -> App:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ConfigError(f"expected 'module:app', got {spec!r}")
    cwd = str(Path.cwd())
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"cannot import {module_name!r}: {exc}") from None
    app = getattr(module, attr, None)
    if not isinstance(app, App):
        raise ConfigError(f"{spec!r} is not a consumer.App (found {type(app).__name__})")
    return app
