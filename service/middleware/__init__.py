"""Pure ASGI middleware, one per module (no BaseHTTPMiddleware: it would cost the hot path a task and a copy
per request). From the outside in, as ``service.app`` stacks them:

- ``Observability``: request id, request metrics, one access-log line per request;
- ``ServerErrors``: what escapes the app before an answer started (500, 503 at shutdown, 499 client gone);
- auth (``service.auth``), then ``BodyLimit``: the body's size and arrival time;
- ``ContentEncoding``: a gzip or deflate body inflated (bounded), any other coding refused;
- ``HeadAsGet``: HEAD answered wherever GET is.
"""

from service.middleware.body_limit import BodyLimit
from service.middleware.content_encoding import ContentEncoding
from service.middleware.head import HeadAsGet
from service.middleware.observability import Observability, RouteTemplates
from service.middleware.server_errors import ServerErrors

__all__ = ["BodyLimit", "ContentEncoding", "HeadAsGet", "Observability", "RouteTemplates", "ServerErrors"]
