"""paho-mqtt 2 on its defaults (MQTT 5, clean_start MQTT_CLEAN_START_FIRST_ONLY, a Session
Expiry Interval set by the app) loses its network after subscribing, then reconnects.

Usage: paho_resume.py PORT USER TOKEN. Prints `connected <session present>` at each CONNACK and
`subscribed` once subscribed, waits for a line on stdin (the test publishes meanwhile),
reconnects, and prints `message <payload>` for what arrives within 10 s.
"""
import sys
import threading

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

port, user, token = int(sys.argv[1]), sys.argv[2], sys.argv[3]
connected, subscribed, got = threading.Event(), threading.Event(), threading.Event()

client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="paho-phone", protocol=mqtt.MQTTv5)
client.username_pw_set(user, token)


def on_connect(_client, _userdata, flags, _reason_code, _properties):
    print("connected", flags.session_present, flush=True)
    connected.set()


def on_subscribe(_client, _userdata, _mid, _codes, _properties):
    subscribed.set()


def on_message(_client, _userdata, message):
    print("message", message.payload.decode(), flush=True)
    got.set()


client.on_connect, client.on_subscribe, client.on_message = on_connect, on_subscribe, on_message
properties = Properties(PacketTypes.CONNECT)
properties.SessionExpiryInterval = 600
client.connect("127.0.0.1", port, keepalive=30, properties=properties)
client.loop_start()
assert connected.wait(10), "no CONNACK"
client.subscribe("chat/c1", qos=1)
assert subscribed.wait(10), "no SUBACK"
print("subscribed", flush=True)
# The network goes: no DISCONNECT, the socket just closes.
client.loop_stop()
client.socket().close()
sys.stdin.readline()
connected.clear()
client.reconnect()
client.loop_start()
assert connected.wait(10), "no CONNACK on reconnect"
got.wait(10)
client.loop_stop()
