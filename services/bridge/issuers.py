"""Who issued a command that came over AMQP, and whether that issuer may send it at all.

The issuer is the publisher's broker user, from the message's `user_id`: RabbitMQ refuses a publish
whose `user_id` is not the connection's user, so the property is proof, unlike anything in the body.
`amqp_publisher_roles` gives each broker user its roles; a delegate (`amqp_delegates`: the gateway,
which verified a bearer token) names the end user it acts for in the command's `issued_by`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from services.bridge.lifecycles import Outcome, forbidden
from shared.authorization import may_issue
from shared.contracts import Actor, Command, Role
from shared.settings import Settings

NO_USER_ID = "publish with user_id set to your broker user"
NOT_A_DELEGATE = "issued_by names someone else, and this broker user is not a delegate"
NO_ROLE = "the issuer has no role that may send this command"


class PublisherIdentities:
    """Broker users' roles and delegations, as configured."""

    def __init__(self, roles: Mapping[str, Iterable[Role]], delegates: Iterable[str]) -> None:
        self._roles = {user: frozenset(granted) for user, granted in roles.items()}
        self._delegates = frozenset(delegates)

    @classmethod
    def of(cls, settings: Settings) -> PublisherIdentities:
        return cls(settings.amqp_publisher_roles, settings.amqp_delegates)

    def authorize(self, user_id: str | None, command: Command) -> Actor | Outcome:
        """The command's verified issuer, or why the command is forbidden."""
        issuer = self.issuer(user_id, command.issued_by)
        if isinstance(issuer, Actor) and not may_issue(command.type, issuer):
            return forbidden(NO_ROLE)
        return issuer

    def issuer(self, user_id: str | None, claimed: Actor | None) -> Actor | Outcome:
        """The broker user `user_id` itself, or the actor a delegate names in `claimed`."""
        if not user_id:
            return forbidden(NO_USER_ID)
        if claimed is not None and user_id in self._delegates:
            return claimed
        own = Actor(subject=user_id, roles=self._roles.get(user_id, frozenset()))
        if claimed is not None and claimed != own:
            return forbidden(NOT_A_DELEGATE)
        return own
