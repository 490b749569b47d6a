"""Who may issue which command: one set of rules for the gateway, the bridge and the workflow (free
of I/O). Roles are checked on arrival; the rules that depend on the order (its placer, its review)
where the order is known, by the bridge or the workflow."""

from __future__ import annotations

from collections.abc import Mapping

from shared.contracts import Actor, CommandType, Role

FORBIDDEN = "forbidden"

# the roles that may issue a command type at all, before the order is looked at
ROLES_FOR: dict[CommandType, frozenset[Role]] = {
    CommandType.PLACE: frozenset({Role.CUSTOMER, Role.OPERATOR}),
    CommandType.APPROVE: frozenset({Role.REVIEWER, Role.OPERATOR}),
    CommandType.CANCEL: frozenset({Role.CUSTOMER, Role.REVIEWER, Role.OPERATOR}),
    CommandType.UPDATE_ADDRESS: frozenset({Role.CUSTOMER, Role.OPERATOR}),
}


def role_names(claims: Mapping[str, object], claim_path: str) -> list[str]:
    """The role names under `claim_path` (dots nest): a list of names or a space-separated string."""
    value: object = claims
    for name in claim_path.split("."):
        value = value.get(name) if isinstance(value, dict) else None
    if isinstance(value, str):
        value = value.split()
    return [name for name in value if isinstance(name, str)] if isinstance(value, list) else []


def may_issue(command_type: CommandType, actor: Actor | None) -> bool:
    """Whether `actor` holds a role that can issue `command_type` on some order."""
    return actor is not None and actor.has(*ROLES_FOR[command_type])


def refusal(
    command_type: CommandType, actor: Actor | None, placed_by: str | None, in_review: bool
) -> str | None:
    """Why `actor` may not issue `command_type` on an order placed by `placed_by` (None: allowed)."""
    if actor is None or not may_issue(command_type, actor):
        return "the issuer has no role that may send this command"
    placer = placed_by is not None and actor.subject == placed_by
    placer_or_operator = placer or actor.has(Role.OPERATOR)
    match command_type:
        case CommandType.APPROVE if placer:
            return "nobody approves an order they placed (four eyes)"
        case CommandType.CANCEL if not (placer_or_operator or (in_review and actor.has(Role.REVIEWER))):
            return "only its placer, an operator, or a reviewer while it is in review cancels an order"
        case CommandType.UPDATE_ADDRESS if not placer_or_operator:
            return "only its placer or an operator changes an order's address"
    return None
