"""All configuration, read once from the environment (prefix `ORDERFLOW_`) or a `.env` file.

Defaults are safe for a developer machine: everything on loopback, the services' stock credentials.
"""

from __future__ import annotations

from functools import lru_cache

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from shared.lifecycle import LifecyclePolicy


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ORDERFLOW_", env_file=".env", extra="ignore")

    # connections
    database_url: str = "postgresql+asyncpg://postgres@127.0.0.1:5432/orderflow"
    amqp_url: str = "amqp://guest:guest@127.0.0.1:5672/"
    temporal_address: str = "127.0.0.1:7233"
    temporal_namespace: str = "default"

    # task queues
    order_task_queue: str = "order-tq"
    shipping_task_queue: str = "shipping-tq"

    # broker queues owned by orderflow (the exchanges are the public contract and fixed)
    command_queue: str = Field(
        default="orders.commands.bridge", description="approve, cancel and update-address commands"
    )
    placement_queue: str = Field(
        default="orders.commands.place", description="PlaceOrder commands waiting for admission"
    )
    audit_queue: str = "orders.events.audit"
    command_prefetch: int = Field(default=64, ge=1)
    max_command_deliveries: int = Field(
        default=5, ge=1, description="deliveries of one command before it is dead-lettered"
    )
    placement_prefetch: int = Field(
        default=100, ge=1, description="placements one bridge holds (registered, waiting for a slot) at once"
    )
    audit_prefetch: int = Field(default=64, ge=1)
    max_event_deliveries: int = Field(
        default=5, ge=1, description="deliveries of one event to the audit consumer before dead-lettering"
    )

    # admission and shedding: RabbitMQ holds the placements the running lifecycles leave waiting
    max_running_lifecycles: int = Field(
        default=24, ge=1, description="lifecycles running at once, across all bridges"
    )
    placement_backlog_limit: int = Field(
        default=2000,
        ge=1,
        description="placements waiting in the broker before new ones are refused (503 / negative confirm); "
        "fixed when the placement queue is first declared",
    )
    shed_retry_after_seconds: int = Field(
        default=5, ge=1, description="Retry-After of a 503 for a placement refused because the backlog is full"
    )

    workflow_sandbox: bool = Field(
        default=False,
        description="run workflows in Temporal's sandbox in production too (the tests always do); "
        "costs about a quarter of the workers' CPU",
    )

    # how many of each service `make run` starts (competing consumers / pollers)
    bridge_instances: int = Field(default=1, ge=1)
    worker_instances: int = Field(default=1, ge=1)

    # lifecycle timing: the contract says every lifecycle ends within 15 s of its start
    review_window_seconds: float = Field(default=8.0, gt=0)
    lifecycle_deadline_seconds: float = Field(default=14.0, gt=0)
    max_shipping_attempts: int = Field(default=3, ge=1)
    activity_attempt_timeout_seconds: float = Field(
        default=0.3, gt=0, description="start-to-close of one business-step attempt"
    )
    parallel_attempts: int = Field(
        default=3, ge=1, le=5, description="attempts of one business step in flight at once"
    )
    dispatch_attempts_per_shipment: int = Field(default=12, ge=1)

    # HTTP gateway
    api_host: str = "127.0.0.1"
    api_port: int = 8000
    api_url: str = "http://127.0.0.1:8000"

    log_level: str = "INFO"
    log_json: bool = True

    def lifecycle_policy(self) -> LifecyclePolicy:
        return LifecyclePolicy(
            review_window_seconds=self.review_window_seconds,
            lifecycle_deadline_seconds=self.lifecycle_deadline_seconds,
            max_shipping_attempts=self.max_shipping_attempts,
            activity_attempt_timeout_seconds=self.activity_attempt_timeout_seconds,
            parallel_attempts=self.parallel_attempts,
            dispatch_attempts_per_shipment=self.dispatch_attempts_per_shipment,
            shipping_task_queue=self.shipping_task_queue,
        )

    @model_validator(mode="after")
    def _review_fits_in_lifecycle(self) -> Settings:
        if self.review_window_seconds >= self.lifecycle_deadline_seconds:
            raise ValueError("review_window_seconds must be shorter than lifecycle_deadline_seconds")
        return self


@lru_cache
def get_settings() -> Settings:
    return Settings()
