"""The workshop's library: settings, stores, base model, services and notebook helpers.

Submodules are imported on demand (``from helpers.backend import open_backend``) so that light
faces, such as the API in Lambda, never import torch or diffusers.
"""

from helpers.settings import Settings, SettingsError, get_settings, load_settings

__all__ = ["Settings", "SettingsError", "get_settings", "load_settings"]
