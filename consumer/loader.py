"""Import ``module:attribute`` as an App, with one clear error line when it cannot."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

from consumer.app import App
from consumer.errors import ConfigError


class AppImportError(ConfigError):
    """``module:app`` names nothing importable, or not an App (the CLI's RET_IMPORT)."""


def load_app(spec: str) -> App:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise AppImportError(f"expected 'module:app', got {spec!r}")
    cwd = str(Path.cwd())
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise AppImportError(f"cannot import {module_name!r}: {exc}") from None
    app = getattr(module, attr, None)
    if not isinstance(app, App):
        raise AppImportError(f"{spec!r} is not a consumer.App (found {type(app).__name__})")
    return app
