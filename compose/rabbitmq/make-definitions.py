#!/usr/bin/env python3
"""Writes definitions.json: one RabbitMQ user per txpipe service with only the permissions it
needs in namespace `txpipe`. Change a password here and run it again (hashes are salted SHA-256,
RabbitMQ's rabbit_password_hashing_sha256). The passwords are development defaults: change
them (and TXPIPE_AMQP_URL in compose.yaml) before exposing the broker."""
import base64, hashlib, json, os

USERS = {  # user: (password, tags)
    "txpipe-admin": ("txpipe-admin", ["administrator"]),
    "txpipe-gateway": ("gateway-secret", []),
    "txpipe-validator": ("validator-secret", []),
    "txpipe-transformer": ("transformer-secret", []),
    "txpipe-notifier": ("notifier-secret", []),
}
# configure (declare), write (publish to an exchange, bind a queue), read (consume, bind from an exchange)
# A service may configure and consume only its own queue: declaring a queue with a dead-letter
# exchange needs read (the right to consume) on it, so the other stages' queues are created by
# `txpipe provision` as txpipe-admin, and a service refused to declare one checks it exists.
PERMISSIONS = {
    "txpipe-admin": (".*", ".*", ".*"),
    # declares the exchanges and the DLQ; publishes file.uploaded; hears verdicts and final
    # statuses (for uploads that wait for theirs) on an exclusive queue of its own,
    # txpipe.gateway.<random>, bound to the pipeline and notifications exchanges (it may
    # consume only that queue, and publish no notification)
    "txpipe-gateway": (r"^txpipe\.(pipeline|notifications|dlx|dlq|gateway\.[0-9a-f]{32})$",
                       r"^txpipe\.(pipeline|dlq|gateway\.[0-9a-f]{32})$",
                       r"^txpipe\.(pipeline|notifications|dlx|gateway\.[0-9a-f]{32})$"),
    # consumes its queue; publishes the next message, dead-letter copies and file.failed notices
    "txpipe-validator": (r"^txpipe\.(pipeline|notifications|dlx|dlq|validator)$",
                         r"^txpipe\.(pipeline|notifications|dlx|dlq|validator)$",
                         r"^txpipe\.(pipeline|dlx|validator)$"),
    "txpipe-transformer": (r"^txpipe\.(pipeline|notifications|dlx|dlq|transformer)$",
                           r"^txpipe\.(pipeline|notifications|dlx|dlq|transformer)$",
                           r"^txpipe\.(pipeline|dlx|transformer)$"),
    # publishes notifications, never to the pipeline
    "txpipe-notifier": (r"^txpipe\.(pipeline|notifications|dlx|dlq|notifier)$",
                        r"^txpipe\.(notifications|dlx|dlq|notifier)$",
                        r"^txpipe\.(pipeline|dlx|notifier)$"),
}

def password_hash(user, password):
    salt = hashlib.sha256(("txpipe-salt-" + user).encode()).digest()[:4]
    return base64.b64encode(salt + hashlib.sha256(salt + password.encode()).digest()).decode()

definitions = {
    "rabbit_version": "3.13.0",
    "vhosts": [{"name": "/"}],
    "users": [{"name": u, "password_hash": password_hash(u, pw), "hashing_algorithm": "rabbit_password_hashing_sha256",
               "tags": tags} for u, (pw, tags) in USERS.items()],
    "permissions": [{"user": u, "vhost": "/", "configure": c, "write": w, "read": r}
                    for u, (c, w, r) in PERMISSIONS.items()],
}
path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "definitions.json")
with open(path, "w") as f:
    json.dump(definitions, f, indent=2)
    f.write("\n")
print("wrote", path)
