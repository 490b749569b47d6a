"""The REST gateway: commands in over HTTP (published to RabbitMQ), status and history out."""
