"""Broker URLs: one or several, for failover between cluster nodes.

Every party accepts a comma-separated list of AMQP URLs. pika's
BlockingConnection takes a list of parameters and tries them in order,
so a connection goes to the first node that accepts it.
"""

import pika
import pika.exceptions

AUTHENTICATION_ERRORS = (
    pika.exceptions.ProbableAuthenticationError,
    pika.exceptions.ProbableAccessDeniedError,
)
"""Connection errors that retrying cannot fix: wrong user, password or vhost."""


def transient_channel_error(exc: BaseException) -> bool:
    """Tell whether a declaration failed only because a cluster node just stopped.

    A classic queue lives on the node where it was declared. For a short
    while after that node stops, declaring it on another node fails with
    404 NOT_FOUND (or 405 RESOURCE_LOCKED for an exclusive queue of a
    connection that node has not dropped yet); a later attempt succeeds.
    """
    return isinstance(exc, pika.exceptions.ChannelClosedByBroker) and exc.reply_code in (404, 405)


def retryable_broker_error(exc: BaseException) -> bool:
    """Tell whether connecting again later may succeed where ``exc`` failed."""
    if transient_channel_error(exc):
        return True
    return isinstance(exc, pika.exceptions.AMQPConnectionError) and not isinstance(
        exc, AUTHENTICATION_ERRORS
    )


def split_urls(urls: str) -> list[str]:
    parts = [part.strip() for part in urls.split(",")]
    found = [part for part in parts if part]
    if not found:
        raise ValueError(f"no broker URL in {urls!r}: give amqp://user:password@host:port/vhost")
    return found


def connection_parameters(urls: str, **settings: object) -> list[pika.URLParameters]:
    """Build pika parameters for each URL, with the same ``settings`` applied."""
    result = []
    for url in split_urls(urls):
        parameters = pika.URLParameters(url)
        for name, value in settings.items():
            setattr(parameters, name, value)
        result.append(parameters)
    return result


def redact_url(urls: str) -> str:
    """Hide the passwords of one or several AMQP URLs for logs and errors."""
    shown = []
    for url in split_urls(urls):
        parameters = pika.URLParameters(url)
        shown.append(f"amqp://{parameters.credentials.username}:***@{parameters.host}:{parameters.port}")
    return ",".join(shown)
