"""Publishing desired states: retained, QoS 1, and only counted as published once the broker acknowledged.

``publish_many`` sends a whole batch before waiting (up to 100 unacknowledged at once), so a rollout stage of
1,000 devices costs about one round trip per 100 devices, not one per device in turn.
"""

from __future__ import annotations

import threading
import time
from urllib.parse import urlparse

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion


class MqttPublisher:
    def __init__(self, broker_url: str, client_id: str = "edgefleet-rollouts", timeout: float = 5.0) -> None:
        u = urlparse(broker_url)
        self.timeout = timeout
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=True,
                                  protocol=mqtt.MQTTv311)
        if u.scheme == "mqtts":
            self.client.tls_set()
        self.client.reconnect_delay_set(1, 30)
        self.client.max_inflight_messages_set(100)
        self._connected = threading.Event()
        # Connections made so far. A clean session holds nothing across a reconnect, and a broker that went
        # down may come back without the retained desired states it had acknowledged (Mosquitto saves them only
        # every autosave_interval; a kill -9 loses what changed since): the service publishes every desired
        # state again after each new connection (RolloutService.publish_pending).
        self.connects = 0

        def on_connect(*_: object) -> None:
            self.connects += 1
            self._connected.set()

        self.client.on_connect = on_connect
        self.client.on_disconnect = lambda *a: self._connected.clear()
        self.client.connect_async(u.hostname or "127.0.0.1", u.port or 1883, keepalive=30)
        self.client.loop_start()

    def publish_many(self, messages: list[tuple[str, str]]) -> list[bool]:
        """Publish every ``(topic, payload)`` (retained, QoS 1), then wait for their acknowledgements together,
        bounded by ``timeout`` in all. True where the broker acknowledged; the others are retried later."""
        if not messages:
            return []
        if not self._connected.wait(self.timeout):
            return [False] * len(messages)
        infos = [self.client.publish(t, p, qos=1, retain=True) for t, p in messages]
        deadline = time.monotonic() + self.timeout
        done: list[bool] = []
        for info in infos:
            if info.rc != mqtt.MQTT_ERR_SUCCESS:
                done.append(False)
                continue
            try:
                info.wait_for_publish(max(0.0, deadline - time.monotonic()))
            except (RuntimeError, ValueError):
                done.append(False)
                continue
            done.append(info.is_published())
        return done

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()
