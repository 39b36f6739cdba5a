"""`bitdance-rt serve`: OpenAI's Images API (POST /v1/images/generations, streaming included),
/health and Prometheus /metrics over one warm Pipeline. Needs the [serve] extra."""

try:
    import fastapi  # noqa: F401
    import prometheus_client  # noqa: F401
    import uvicorn  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the environment
    from ..errors import BitDanceError

    raise BitDanceError(
        f"bitdance-rt serve needs the [serve] extra: pip install 'bitdance-rt[serve]' ({exc.name} is missing)"
    ) from None

from .app import ServerSettings, make_app  # noqa: E402
from .server import serve  # noqa: E402

__all__ = ["ServerSettings", "make_app", "serve"]
