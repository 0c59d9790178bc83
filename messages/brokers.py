"""Broker URLs: one or several, for failover between cluster nodes.

Every party accepts a comma-separated list of AMQP URLs. pika's
BlockingConnection takes a list of parameters and tries them in order,
so a connection goes to the first node that accepts it.
"""

import urllib.parse

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


URL_FORM = "amqp://USER:PASSWORD@HOST:PORT/VHOST, or several such URLs separated by commas"


def check_urls(urls: str) -> None:
    """Raise ValueError unless ``urls`` lists amqp:// or amqps:// URLs with a host.

    ``urls`` is one URL or several separated by commas, tried in order.
    The message never contains a password.
    """
    try:
        parts_of_urls = [urllib.parse.urlsplit(url) for url in split_urls(urls)]
        for parts in parts_of_urls:
            parts.port  # noqa: B018 - reading it raises ValueError for a port that is not a number
    except ValueError as exc:
        raise ValueError(f"{exc}; expected {URL_FORM}") from None
    for parts in parts_of_urls:
        if parts.scheme not in ("amqp", "amqps") or not parts.hostname:
            # The URL may contain a password, so only its scheme and host are shown.
            raise ValueError(
                f"URL with scheme {parts.scheme!r} and host {parts.hostname!r} is not an AMQP URL;"
                f" expected {URL_FORM}"
            )
        try:
            pika.URLParameters(urllib.parse.urlunsplit(parts))
        except ValueError as exc:
            # pika raises it for query options such as ?heartbeat=x. Its text
            # names the option and value, never the password.
            raise ValueError(f"{exc}; see pika's URLParameters for the query options") from None


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
