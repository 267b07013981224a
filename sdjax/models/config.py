"""The generic config helpers moved to :mod:`sdjax.config` (they serve models, schedulers and loaders alike);
this import path stays for existing code."""

from sdjax.config import METADATA_KEYS, ConfigError, parse_config, read_json  # noqa: F401
