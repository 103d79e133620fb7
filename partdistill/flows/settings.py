"""Prefect settings the project needs, applied before Prefect is imported.

The ephemeral API server (used when no server is configured) must start within
PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS; the default 20 s was missed here on 2 busy
cores. Analytics are off: these machines reach no outside host. A value the user set wins.
"""

import os

DEFAULTS = {
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_API_HOST": "127.0.0.1",
}


def apply_prefect_defaults() -> None:
    for key, value in DEFAULTS.items():
        os.environ.setdefault(key, value)
