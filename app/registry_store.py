"""The model registry in SQL: versions (with the serialised model), roles and rollout history.

`model_rollouts` is the source of truth for roles: loading replays it through the same
rules as `models.registry.Registry` (`roles_from_history`). `model_roles` is written beside
it, in the same transaction, so that SQL readers can see who serves without replaying.
Model bytes are written when a version is registered and then by the learner's checkpoint
participant (`write_models`), in the checkpoint's transaction.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Engine, Text, cast, select, update
from sqlalchemy.engine import Connection

from app import db
from app.start_errors import DAMAGED_DATABASE_FIXES
from models.registry import ModelCard, Registry, RolloutEntry


@dataclass
class Roles:
    champion: str | None
    shadow: str | None
    previous_champions: list[str]
    shadowed: set[str]
    retired: set[str]


def roles_from_history(history: Iterable[RolloutEntry]) -> Roles:
    """Replay rollout entries into roles, by the registry's rules.

    >>> from datetime import datetime, timezone
    >>> at = datetime(2026, 11, 26, tzinfo=timezone.utc)
    >>> steps = [("promote", "v1"), ("shadow", "v2"), ("promote", "v2"), ("shadow", "v3"), ("rollback", "v1")]
    >>> roles = roles_from_history(RolloutEntry(at, a, v, "ops") for a, v in steps)
    >>> roles.champion, roles.shadow, roles.previous_champions, sorted(roles.shadowed)
    ('v1', 'v3', [], ['v2', 'v3'])
    """
    r = Roles(None, None, [], set(), set())
    for e in history:
        action, version = e.action, e.version
        if action == "promote":  # as Registry.promote
            r.previous_champions = [v for v in r.previous_champions if v != version]
            if r.champion is not None:
                r.previous_champions.append(r.champion)
            r.champion = version
            if r.shadow == version:
                r.shadow = None
        elif action == "shadow":
            r.shadow = version
            r.shadowed.add(version)
        elif action == "rollback":
            if r.previous_champions and r.previous_champions[-1] == version:
                r.previous_champions.pop()
            r.champion = version
            if r.shadow == version:
                r.shadow = None
        elif action == "retire":
            r.retired.add(version)
            if r.shadow == version:
                r.shadow = None
            r.previous_champions = [v for v in r.previous_champions if v != version]
    return r


def _card_row(card: ModelCard) -> dict[str, Any]:
    # The rollout history lives in model_rollouts, once per entry.
    return {k: v for k, v in card.to_dict().items() if k != "rollout_history"}


def _aware(moment: datetime) -> datetime:
    # SQLite hands back naive datetimes; everything stored is UTC.
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


class UnreadableModel(Exception):
    """A version's saved model (`model_versions.model`) cannot be decoded (cut short, or overwritten by hand or by
    a disk fault). Its message names the version and the fix, a sentence left open for what to do after; an
    UnpicklingError (or ValueError, ...) traceback named neither. Read by the start (a version not retired), by
    `tipstream users export` and by a forget's last step (every version's, retired ones too)."""

    def __init__(self, version: str, cause: str) -> None:
        super().__init__(
            f"The saved model of version {version!r} cannot be read ({cause}): the database holds it damaged. "
            f"{DAMAGED_DATABASE_FIXES}")
        self.version, self.cause = version, cause


def decoded_model(version: str, blob: bytes) -> Any:
    """The `TipModel` in `version`'s saved bytes; UnreadableModel when they cannot be decoded."""
    from models.reward import TipModel  # River's import: only when a model is read

    try:
        return TipModel.from_bytes(bytes(blob))
    except Exception as error:  # noqa: BLE001 - damaged bytes fail as pickle, numpy or JSON do: a dozen types
        raise UnreadableModel(version, f"{type(error).__name__}: {error}") from None


class UnreadableRegistry(Exception):
    """A registry row (a version's params, feature names or card in `model_versions`, a rollout's `cards` in
    `model_rollouts`) that cannot be decoded: cut short, or overwritten by hand or by a disk fault. Its message names
    the row and the fix, a sentence left open for what to do after."""

    def __init__(self, where: str, cause: str) -> None:
        super().__init__(f"The registry cannot be read: {where} ({cause}), the database holds it damaged. "
                         f"{DAMAGED_DATABASE_FIXES}")
        self.where, self.cause = where, cause


def _damaged_cell(conn: Connection) -> tuple[str, str] | None:
    """The first registry cell whose JSON does not decode, as (which, why); None if each does (then what failed
    is the shape of one). Read as text, cell by cell: decoded as the rows are fetched, the error names none."""
    versions, rollouts = db.model_versions.c, db.model_rollouts.c
    columns = (versions.params, versions.feature_names, versions.card)
    for version, *cells in conn.execute(select(versions.version, *(cast(column, Text) for column in columns))):
        for column, text in zip(columns, cells, strict=True):
            if (why := _undecodable(text)) is not None:
                return f"the {column.name} of version {version!r} (model_versions.{column.name})", why
    for seq, action, version, text in conn.execute(
            select(rollouts.seq, rollouts.action, rollouts.version, cast(rollouts.cards, Text))):
        if (why := _undecodable(text)) is not None:
            return f"the rollout history's entry {seq} ({action} {version}; model_rollouts.cards)", why
    return None


def _undecodable(text: str | None) -> str | None:
    try:
        json.loads(text) if text is not None else None
    except ValueError as error:
        return f"{type(error).__name__}: {error}"
    return None


class RegistryStore:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def load(self) -> tuple[Registry, dict[str, tuple[bytes | None, int]]]:
        """The registry, and each version's latest model bytes (None: never saved) with its learn count;
        UnreadableRegistry when a row of it cannot be decoded (a JSONDecodeError, or a KeyError, traceback named
        neither the row nor a fix)."""
        try:
            return self._load()
        except (ValueError, KeyError, TypeError, AttributeError) as error:  # the database's own errors are not these
            cause = f"{type(error).__name__}: {error}"
            with self.engine.connect() as conn:
                raise UnreadableRegistry(*(_damaged_cell(conn) or ("the registry's rows", cause))) from None

    def _load(self) -> tuple[Registry, dict[str, tuple[bytes | None, int]]]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(db.model_versions).order_by(db.model_versions.c.created_at)).all()
            entries = conn.execute(select(db.model_rollouts).order_by(db.model_rollouts.c.seq)).all()
        history = [(RolloutEntry(_aware(e.at), e.action, e.version, e.actor, e.note), list(e.cards)) for e in entries]
        roles = roles_from_history(entry for entry, _ in history)
        state = {
            "versions": [
                {"version": r.version, "kind": r.kind, "params": r.params, "feature_names": r.feature_names,
                 "created_at": _aware(r.created_at).isoformat(), "card": r.card}
                for r in rows
            ],
            "champion": roles.champion, "shadow": roles.shadow,
            "previous_champions": roles.previous_champions,
            "shadowed": sorted(roles.shadowed), "retired": sorted(roles.retired),
            "history": [entry.to_dict() | {"cards": cards} for entry, cards in history],
        }
        models = {r.version: (bytes(r.model) if r.model is not None else None, int(r.n_learned)) for r in rows}
        return Registry.from_dict(state), models

    def save(self, registry: Registry, *, known_entries: int, new_models: dict[str, tuple[Any, int]],
             extras: Sequence[tuple[Any, Any]] = (), learned: dict[str, int] | None = None) -> None:
        """Persist a registry change in one transaction.

        `known_entries`: how many history entries are already stored (the rest are appended);
        `new_models`: versions registered by this change, as bytes or as models whose `to_bytes`
        makes them here, off the event loop (existing rows keep theirs);
        `extras`: (checkpoint participant, snapshot) pairs written in the same transaction;
        `learned`: rewards learned, for existing versions whose model no checkpoint saves any more (retired).
        """
        now = datetime.now(UTC)
        with self.engine.begin() as conn:
            existing = set(conn.execute(select(db.model_versions.c.version)).scalars())
            for mv in registry.versions.values():
                values = {"kind": mv.kind, "params": mv.to_dict()["params"], "feature_names": list(mv.feature_names),
                          "card": _card_row(mv.card), "updated_at": now}
                if mv.version in existing:
                    if learned and mv.version in learned:
                        values["n_learned"] = learned[mv.version]
                    conn.execute(update(db.model_versions).where(db.model_versions.c.version == mv.version)
                                 .values(**values))
                else:
                    blob, n_learned = new_models.get(mv.version, (None, 0))
                    if blob is not None:
                        blob = model_bytes(blob)
                    conn.execute(db.model_versions.insert().values(
                        version=mv.version, created_at=mv.created_at, model=blob, n_learned=n_learned, **values))
            cards: dict[int, list[str]] = {}
            for v, mv in registry.versions.items():
                for e in mv.card.rollout_history:
                    cards.setdefault(id(e), []).append(v)
            for e in registry.history[known_entries:]:
                conn.execute(db.model_rollouts.insert().values(
                    at=e.at, action=e.action, version=e.version, actor=e.actor, note=e.note,
                    cards=cards.get(id(e), [e.version])))
            conn.execute(db.model_roles.delete())
            since = {}
            for e in registry.history:  # when each current role began
                if e.action in ("promote", "rollback"):
                    since["champion"] = e.at
                elif e.action == "shadow":
                    since["shadow"] = e.at
            for role, version in (("champion", registry.champion), ("shadow", registry.shadow)):
                if version is not None:
                    conn.execute(db.model_roles.insert().values(role=role, version=version, since=since.get(role, now)))
            for participant, snapshot in extras:
                participant.write(conn, snapshot)

    def stored_entries(self) -> int:
        with self.engine.connect() as conn:
            return len(conn.execute(select(db.model_rollouts.c.seq)).all())


def model_bytes(model: Any) -> bytes:
    """Bytes as they are, or made from a model (or frozen copy) here, off the event loop."""
    return model if isinstance(model, bytes) else model.to_bytes()


def write_models(conn: Connection, models: dict[str, tuple[Any, int]]) -> None:
    """The learner's model snapshots, inside the checkpoint transaction: bytes, or a model
    whose `to_bytes` makes them here (off the event loop; `learner_checkpoint.ModelBytes`)."""
    now = datetime.now(UTC)
    for version, (model, n_learned) in models.items():
        blob = model_bytes(model)
        conn.execute(update(db.model_versions).where(db.model_versions.c.version == version)
                     .values(model=blob, n_learned=n_learned, updated_at=now))
