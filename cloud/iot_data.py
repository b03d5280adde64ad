"""AWS IoT Core's data plane (boto3 ``iot-data``): announcements published where no store broker is used.

``iot://`` uses the account's ATS data endpoint (``describe_endpoint``), or ``AWS_ENDPOINT_URL_IOT_DATA`` /
``AWS_ENDPOINT_URL`` when set (boto3's own variables; moto in tests); ``iot://ENDPOINT`` names the endpoint
host. Credentials and region come from boto3's standard chain. IoT Core keeps a retained message per topic
(QoS 0 or 1, payload at most 128 KiB), so a kiosk connecting later still gets the latest announcement.
"""

from __future__ import annotations

import logging
import os
import urllib.parse
from typing import Any

_LOGGER = logging.getLogger(__name__)

MAX_PAYLOAD_BYTES = 128 * 1024  # IoT Core's message size limit
_ENDPOINT_ENVS = ("AWS_ENDPOINT_URL_IOT_DATA", "AWS_ENDPOINT_URL")


class IotDataError(Exception):
    """IoT Core refused the publish, or could not be reached, or no credentials."""


class IotPublisher:
    """Publishes through a boto3 ``iot-data`` client."""

    def __init__(self, client: Any) -> None:
        self._client = client

    @classmethod
    def from_url(cls, url: str) -> IotPublisher:
        """A publisher for ``iot://`` (discovered endpoint) or ``iot://HOST[:PORT]`` (that endpoint)."""
        import boto3
        import botocore.exceptions as bex

        parts = urllib.parse.urlsplit(url)
        if parts.scheme != "iot":
            raise IotDataError(f"not an IoT Core URL: {url!r} (iot:// or iot://ENDPOINT)")
        kwargs: dict[str, Any] = {}
        region = urllib.parse.parse_qs(parts.query).get("region")
        if region:
            kwargs["region_name"] = region[0]
        session = boto3.session.Session()  # fresh: the default session caches credentials for the process
        try:
            if parts.hostname:
                kwargs["endpoint_url"] = f"https://{parts.netloc}"
            elif not any(os.environ.get(e) for e in _ENDPOINT_ENVS):
                iot = session.client("iot", **kwargs)
                host = iot.describe_endpoint(endpointType="iot:Data-ATS")["endpointAddress"]
                kwargs["endpoint_url"] = f"https://{host}"
            return cls(session.client("iot-data", **kwargs))
        except bex.NoCredentialsError as exc:
            raise IotDataError("no AWS credentials (environment, ~/.aws, or an instance role)") from exc
        except bex.NoRegionError as exc:
            raise IotDataError("no AWS region: set AWS_REGION or iot://?region=NAME") from exc
        except (bex.BotoCoreError, bex.ClientError) as exc:
            raise IotDataError(f"cannot find the IoT Core data endpoint: {exc}") from exc

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> None:
        """One message; IotDataError with IoT Core's own reason on refusal."""
        import botocore.exceptions as bex

        if len(payload) > MAX_PAYLOAD_BYTES:
            raise IotDataError(f"{len(payload)} bytes on {topic}: IoT Core takes at most {MAX_PAYLOAD_BYTES}")
        try:
            self._client.publish(topic=topic, qos=qos, retain=retain, payload=payload)
        except bex.NoCredentialsError as exc:
            raise IotDataError("no AWS credentials (environment, ~/.aws, or an instance role)") from exc
        except bex.ClientError as exc:
            err = exc.response.get("Error", {})
            raise IotDataError(f"IoT Core refused {topic}: {err.get('Code')}: {err.get('Message')}") from exc
        except bex.BotoCoreError as exc:
            raise IotDataError(f"IoT Core publish on {topic} failed: {exc}") from exc
        _LOGGER.info("published %d bytes to IoT Core on %s (retain %s)", len(payload), topic, retain)
