"""What the tests and the benches share: sample orders and their commands (`orders`), a poll
(`polling`), the broker's side (`amqp`), services run in-process (`services`), the gateway
(`gateway`), read-model rows (`read_model`), the whole system as processes (`system`), Temporal
look-ups (`temporal`) and servers of our own to restart (`servers`).

tests/conftest.py loads the modules with fixtures as pytest plugins; bench/ imports what it needs.
"""
