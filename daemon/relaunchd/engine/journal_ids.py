"""Journal MESSAGE_IDs (stable; docs/dbus-api.md lists them): `journalctl MESSAGE_ID=…`
finds every relaunchd event of one kind across a fleet."""

MESSAGE_IDS = {
    "staging": "87b4b87f1a2143238de3e8af19a34d6a",
    "staged": "3763d68974604e1cafacf0c7c26f6750",
    "relaunch": "7b7b7ffb71044338b515f239ed8dc55b",
    "failure": "3b2b449eafb24db1ac3426aa30be85dc",
    "verified": "5f3e9c2a8d8b4f0c9a57c1b1e2d4a6f0",
    "unverified": "c4a1d7e90b3f4e6f8e2d5b7a9c0f1e23",
}
