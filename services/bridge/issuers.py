"""Who issued a command that came over AMQP: the publisher's broker user (RabbitMQ checks the
message's `user_id`), or the end user a delegate (the gateway) names in `issued_by`; and whether
that issuer may send it."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from services.bridge.lifecycles import Outcome, forbidden
from shared.authorization import may_issue
from shared.contracts import Actor, Command, Role

NO_USER_ID = "publish with user_id set to your broker user"
NOT_A_DELEGATE = "issued_by names someone else, and this broker user is not a delegate"
NO_ROLE = "the issuer has no role that may send this command"


class PublisherIdentities:
    """Broker users' roles and delegations, as configured."""

    def __init__(self, roles: Mapping[str, Iterable[Role]], delegates: Iterable[str]) -> None:
        self._roles = {user: frozenset(granted) for user, granted in roles.items()}
        self._delegates = frozenset(delegates)

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
