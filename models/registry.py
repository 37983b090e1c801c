"""Model registry logic: versions, model cards, and the champion and shadow roles.

Pure and in memory; `app/` persists it (`Registry.to_dict` / `Registry.from_dict`).

Rules (the product's "shadow before any policy change that affects real users"):

- `register` adds a version; it serves nobody.
- `set_shadow` makes a version the shadow: it scores every request beside the champion and
  its answers are logged, never shown.
- `promote` makes a version the champion; only a version that has run as shadow may be
  promoted. The old champion is remembered, and `rollback` restores it.
- `bootstrap` makes the very first champion, when there is none to shadow against.
- `retire` takes a version out of service for good (never the champion).

Version names are exact; one that differs from a registered name only in case is refused at `register` (the two
would be taken one for the other), and a lookup by it names the registered one.

Every change appends a `RolloutEntry` to the registry's history and to the card of each
version whose role it changes.

>>> from datetime import datetime, timezone
>>> clock = lambda: datetime(2026, 11, 26, 9, 0, tzinfo=timezone.utc)
>>> reg = Registry(clock=clock)
>>> for v in ("v1", "v2"):
...     reg.register(ModelVersion(v, "logreg", {}, ["hour_of_day"], clock()), actor="ci")
>>> reg.bootstrap("v1", actor="ops")
>>> reg.promote("v2", actor="ops")
Traceback (most recent call last):
...
models.registry.RegistryError: Version 'v2' has not run as shadow; run `tipstream models shadow v2` first.
>>> reg.set_shadow("v2", actor="ops"); reg.promote("v2", actor="ops")
>>> reg.champion, reg.shadow
('v2', None)
>>> reg.rollback(actor="ops")
'v1'
>>> [(e.action, e.version) for e in reg.history]
[('register', 'v1'), ('register', 'v2'), ('promote', 'v1'), ('shadow', 'v2'), ('promote', 'v2'), ('rollback', 'v1')]
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal, get_args

from models.offpolicy import MIN_EFFECTIVE_N

Action = Literal["register", "promote", "shadow", "rollback", "retire", "evaluate"]
ACTIONS: tuple[Action, ...] = get_args(Action)
CLI = "tipstream models"  # named in error messages, so an operator knows what to type


def _utcnow() -> datetime:
    return datetime.now(UTC)


class RegistryError(Exception):
    """A refused registry change. `code` maps to an HTTP status: not_found -> 404,
    conflict -> 409, invalid -> 422; `field`, when set, is the request's field at fault."""

    def __init__(self, message: str, code: Literal["not_found", "conflict", "invalid"] = "conflict",
                 field: str | None = None) -> None:
        super().__init__(message)
        self.code, self.field = code, field

    def __reduce__(self) -> tuple[Any, ...]:
        # Raised in the evaluation process (app.lineup): its code and field must survive the trip.
        return type(self), (str(self), self.code, self.field)


@dataclass(frozen=True)
class RolloutEntry:
    at: datetime
    action: Action
    version: str
    actor: str
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"at": self.at.isoformat(), "action": self.action, "version": self.version,
                "actor": self.actor, "note": self.note}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RolloutEntry:
        return cls(datetime.fromisoformat(d["at"]), d["action"], d["version"], d["actor"], d.get("note", ""))


@dataclass
class ModelCard:
    """What a model reads, how well it did offline, whether it serves segments alike, and
    where it has been deployed.

    `inputs`: feature -> how it is used (`TipModel.describe_inputs()`); `offline_metrics`:
    `progressive_validation` output; `fairness`: `fairness_check` output per segmentation,
    e.g. ``{"tenure": {...}, "timezone": {...}}``.
    """

    inputs: dict[str, str] = field(default_factory=dict)
    offline_metrics: dict[str, Any] = field(default_factory=dict)
    fairness: dict[str, Any] = field(default_factory=dict)
    rollout_history: list[RolloutEntry] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"inputs": dict(self.inputs), "offline_metrics": dict(self.offline_metrics),
                "fairness": dict(self.fairness), "rollout_history": [e.to_dict() for e in self.rollout_history]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelCard:
        # `or {}`: a card written by hand, or by an older release, may hold null parts.
        return cls(dict(d.get("inputs") or {}), dict(d.get("offline_metrics") or {}), dict(d.get("fairness") or {}),
                   [RolloutEntry.from_dict(e) for e in d.get("rollout_history", [])])


# What models registered before these parameters existed were trained with
# (`ModelVersion.model_params`; `TipModel` fills them in when such a snapshot is read back).
LEGACY_PARAMS: dict[str, Any] = {"optimizer": "sgd", "latents": "all", "user_forgetting": 0.0, "user_ttl_days": 0.0,
                                 "max_values": 0}

# Parameters only a factorisation machine reads. `TipModel` keeps them for every kind (they rebuild
# it), but a logreg's card listing `n_factors 8` read as if its latent vectors counted.
FM_ONLY_PARAMETERS = ("n_factors", "seed", "latents")


@dataclass
class ModelVersion:
    """A registered model. The serialised model itself (`TipModel.to_bytes()`) is stored
    beside it by the SQL adapter; `params` rebuild an untrained one (`TipModel(**params)`)."""

    version: str
    kind: str
    params: dict[str, Any]
    feature_names: list[str]
    created_at: datetime = field(default_factory=_utcnow)
    card: ModelCard = field(default_factory=ModelCard)

    @property
    def model_params(self) -> dict[str, Any]:
        """`params` to rebuild the model with: one registered before a parameter existed keeps
        what it meant then (`LEGACY_PARAMS`).

        >>> ModelVersion("v1", "logreg", {"learning_rate": 0.1}, []).model_params["optimizer"]
        'sgd'
        """
        return {**LEGACY_PARAMS, **self.params}

    @property
    def shown_params(self) -> dict[str, Any]:
        """`model_params` that change what this kind of model does: for people (cards, `models show`).

        >>> sorted(ModelVersion("v1", "logreg", {"n_factors": 8, "seed": 1, "l2": 0.0}, []).shown_params)
        ['l2', 'max_values', 'optimizer', 'user_forgetting', 'user_ttl_days']
        >>> ModelVersion("v2", "fm", {"n_factors": 8}, []).shown_params["n_factors"]
        8
        """
        ignored = FM_ONLY_PARAMETERS if self.kind != "fm" else ()
        return {k: v for k, v in self.model_params.items() if k not in ignored}

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.version, "kind": self.kind, "params": _jsonable(self.params),
                "feature_names": list(self.feature_names), "created_at": self.created_at.isoformat(),
                "card": self.card.to_dict()}

    def shown(self) -> dict[str, Any]:
        """`to_dict` for people: `params` as the model takes them, so one registered before a parameter
        existed shows what it means (`LEGACY_PARAMS`), where it hid that such a version forgets no user;
        without those its kind ignores (`shown_params`).

        >>> ModelVersion("v1", "logreg", {"learning_rate": 0.1}, []).shown()["params"]["user_ttl_days"]
        0.0
        """
        return self.to_dict() | {"params": _jsonable(self.shown_params)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelVersion:
        return cls(d["version"], d["kind"], dict(d["params"]), list(d["feature_names"]),
                   datetime.fromisoformat(d["created_at"]), ModelCard.from_dict(d.get("card", {})))


def _jsonable(value: Any) -> Any:
    """Tuples to lists, recursively, so params survive a JSON round trip unchanged in shape."""
    return json.loads(json.dumps(value))


def _check_version_name(version: str) -> None:
    if not isinstance(version, str) or not 1 <= len(version) <= 64 or not version.isprintable() or version != version.strip():
        raise RegistryError(
            f"Version name {version!r} is not valid; use 1-64 printable characters without surrounding spaces.",
            "invalid")


class Registry:
    """Versions plus the champion and shadow roles; see the module docstring for the rules."""

    def __init__(self, clock: Callable[[], datetime] = _utcnow) -> None:
        self.clock = clock
        self.versions: dict[str, ModelVersion] = {}
        self.champion: str | None = None
        self.shadow: str | None = None
        self.previous_champions: list[str] = []  # rollback stack, most recent last
        self.shadowed: set[str] = set()  # versions that have run as shadow at least once
        self.retired: set[str] = set()
        self.history: list[RolloutEntry] = []

    # -- queries ----------------------------------------------------------------------------

    def get(self, version: str) -> ModelVersion:
        mv = self.versions.get(version)
        if mv is None:
            if (alike := self._alike(version)) is not None:
                raise RegistryError(f"No model version {version!r}; did you mean {alike!r}? Version names are "
                                    "case-sensitive.", "not_found", "version")
            known = ", ".join(self.versions) or "none yet"
            raise RegistryError(
                f"Unknown model version {version!r} (known: {known}); list them with `{CLI} list`.", "not_found",
                "version")  # the request's field at fault, whether in the path or the body
        return mv

    def _alike(self, version: str) -> str | None:
        """The registered version named as `version` but for case (None: none). Names are exact, and `promote V2`
        with only v2 registered was told 'unknown' beside a list that held it."""
        folded = version.casefold()
        return next((v for v in self.versions if v != version and v.casefold() == folded), None)

    def check_new_name(self, version: str) -> None:
        """Refuse `version` as a new version's name: registered already, or but for case. Two names that read alike
        (v2 and V2) would be promoted, retired or rolled back one for the other."""
        if version in self.versions:
            raise RegistryError(
                f"Version {version!r} is already registered; versions are immutable, register a new name.")
        if (alike := self._alike(version)) is not None:
            raise RegistryError(
                f"Version {version!r} differs from the registered {alike!r} only in case; names that read alike "
                f"are taken one for the other: register a name of its own (or use {alike!r}).", "conflict", "version")

    def role(self, version: str) -> str | None:
        """"champion", "shadow", "retired" or None."""
        self.get(version)
        if version == self.champion:
            return "champion"
        if version == self.shadow:
            return "shadow"
        return "retired" if version in self.retired else None

    # -- changes ----------------------------------------------------------------------------

    def _record(self, action: Action, version: str, actor: str, note: str, *also: str | None) -> RolloutEntry:
        entry = RolloutEntry(self.clock(), action, version, str(actor), note)
        self.history.append(entry)
        for v in dict.fromkeys((version, *also)):  # each card once, in order
            if v is not None:
                self.versions[v].card.rollout_history.append(entry)
        return entry

    @staticmethod
    def _check_actor(actor: str) -> None:
        # Checked before any state changes, so a refused change leaves nothing half-applied.
        if not isinstance(actor, str) or not actor.strip():
            raise RegistryError("Every registry change needs an actor (who is making it).", "invalid", "actor")

    def _usable(self, version: str, doing: str, actor: str) -> ModelVersion:
        self._check_actor(actor)
        mv = self.get(version)
        if version in self.retired:
            raise RegistryError(
                f"Version {version!r} is retired and cannot be {doing}; register a new version instead.")
        return mv

    def register(self, mv: ModelVersion, actor: str = "system", note: str = "") -> None:
        self._check_actor(actor)
        _check_version_name(mv.version)
        self.check_new_name(mv.version)
        self.versions[mv.version] = mv
        self._record("register", mv.version, actor, note)

    def bootstrap(self, version: str, actor: str, note: str = "") -> None:
        """Make the first champion. Allowed only while there is none: afterwards every
        change goes through a shadow."""
        self._usable(version, "made champion", actor)
        if self.champion is not None:
            raise RegistryError(
                f"There is already a champion ({self.champion!r}); shadow {version!r} with "
                f"`{CLI} shadow {version}`, then promote it.")
        self.champion = version
        if self.shadow == version:  # as `promote`, and as the store replays it (cannot be both)
            self.shadow = None
        self._record("promote", version, actor, note or "initial champion: nothing to shadow against")

    def set_shadow(self, version: str, actor: str, note: str = "") -> None:
        self._usable(version, "shadowed", actor)
        if version == self.champion:
            raise RegistryError(f"Version {version!r} is the champion; shadow a different version.")
        if version == self.shadow:
            raise RegistryError(f"Version {version!r} is already the shadow.")
        previous = self.shadow
        self.shadow = version
        self.shadowed.add(version)
        if previous is not None and not note:
            note = f"replaces shadow {previous}"
        self._record("shadow", version, actor, note, previous)

    def promote(self, version: str, actor: str, note: str = "") -> None:
        self._usable(version, "promoted", actor)
        if version == self.champion:
            raise RegistryError(f"Version {version!r} is already the champion.")
        if version not in self.shadowed:
            raise RegistryError(f"Version {version!r} has not run as shadow; run `{CLI} shadow {version}` first.")
        old = self.champion
        # A version promoted again leaves the stack: a rollback must never "restore" the champion.
        self.previous_champions = [v for v in self.previous_champions if v != version]
        if old is not None:
            self.previous_champions.append(old)
        self.champion = version
        if self.shadow == version:
            self.shadow = None
        if old is not None:  # kept beside a note: the record alone says what it replaced
            note = f"replaces champion {old}" + (f"; {note}" if note else "")
        self._record("promote", version, actor, note, old)

    def rollback(self, actor: str, note: str = "", champion: str | None = None) -> str:
        """Restore the previous champion; returns its version. `champion`: the version to roll back from;
        refused when another is champion by then, so that two rollbacks meant for one champion (two
        operators at once, or a request sent again) do not roll back two.

        >>> from datetime import datetime, timezone
        >>> reg = Registry(clock=lambda: datetime(2026, 11, 26, 9, 0, tzinfo=timezone.utc))
        >>> for v in ("v1", "v2", "v3"):
        ...     reg.register(ModelVersion(v, "logreg", {}, []), actor="ci")
        >>> reg.bootstrap("v1", actor="ops")
        >>> for v in ("v2", "v3"):
        ...     reg.set_shadow(v, actor="ops"); reg.promote(v, actor="ops")
        >>> reg.rollback(actor="alice", champion="v3")
        'v2'
        >>> reg.rollback(actor="bob", champion="v3")
        Traceback (most recent call last):
        ...
        models.registry.RegistryError: Version 'v3' is not the champion: 'v2' is, since its rollback by alice at 2026-11-26T09:00:00+00:00; nothing was rolled back. To roll back from v2 too, run `tipstream models rollback --from v2`.
        >>> reg.rollback(actor="carol", champion="v2"), reg.rollback(actor="dave", champion="v2")
        Traceback (most recent call last):
        ...
        models.registry.RegistryError: Version 'v2' is not the champion: 'v1' is, since its rollback by carol at 2026-11-26T09:00:00+00:00; nothing was rolled back.
        """
        self._check_actor(actor)
        if champion is not None and champion != self.champion:
            since = next((e for e in reversed(self.history)
                          if e.action in ("promote", "rollback") and e.version == self.champion), None)
            when = f", since its {since.action} by {escaped(since.actor)} at {since.at.isoformat()}" if since else ""
            further = (f" To roll back from {self.champion} too, run `{CLI} rollback --from {self.champion}`."
                       if self.previous_champions else "")  # else "no earlier champion" would come next
            raise RegistryError(f"Version {champion!r} is not the champion: {self.champion!r} is{when}; nothing was "
                                f"rolled back.{further}", "conflict", "champion")
        if self.champion is None or not self.previous_champions:
            raise RegistryError(
                "There is no earlier champion to roll back to; promote a shadowed version with "
                f"`{CLI} promote <version>` instead.")
        demoted = self.champion
        restored = self.previous_champions.pop()
        self.champion = restored
        if self.shadow == restored:  # cannot be both
            self.shadow = None
        self._record("rollback", restored, actor, f"from {demoted}" + (f"; {note}" if note else ""), demoted)
        return restored

    def retire(self, version: str, actor: str, note: str = "") -> None:
        """Take a version out of service; it also leaves the rollback stack."""
        self._check_actor(actor)
        if version in self.retired:  # "cannot be retired; register a new version instead" read as a failure to fix
            raise RegistryError(f"Version {version!r} is already retired; there is nothing to do.")
        self._usable(version, "retired", actor)
        if version == self.champion:
            raise RegistryError(
                f"Version {version!r} is the champion; promote another (shadowed) version or roll back "
                f"with `{CLI} rollback` before retiring it.")
        if version == self.shadow:
            self.shadow = None
        self.retired.add(version)
        self.previous_champions = [v for v in self.previous_champions if v != version]
        self._record("retire", version, actor, note)

    def refresh_card(self, version: str, actor: str, note: str = "", **parts: Any) -> ModelCard:
        """Replace parts of a version's card (`inputs`, `offline_metrics`, `fairness`): an
        `evaluate` entry in the history, as every admin change is; roles do not change."""
        self._check_actor(actor)
        card = self.get(version).card
        for name, value in parts.items():
            setattr(card, name, value)
        self._record("evaluate", version, actor, note)
        return card

    # -- persistence ------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready state. Entries are stored once, in `history`, each naming the cards it is on."""
        cards: dict[int, list[str]] = {}
        for v, mv in self.versions.items():
            for e in mv.card.rollout_history:
                cards.setdefault(id(e), []).append(v)
        return {
            "versions": [mv.to_dict() | {"card": mv.card.to_dict() | {"rollout_history": []}}
                         for mv in self.versions.values()],
            "champion": self.champion, "shadow": self.shadow,
            "previous_champions": list(self.previous_champions),
            "shadowed": sorted(self.shadowed), "retired": sorted(self.retired),
            "history": [e.to_dict() | {"cards": cards.get(id(e), [])} for e in self.history],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any], clock: Callable[[], datetime] = _utcnow) -> Registry:
        reg = cls(clock=clock)
        for v in d["versions"]:
            mv = ModelVersion.from_dict(v)
            reg.versions[mv.version] = mv
        reg.champion, reg.shadow = d["champion"], d["shadow"]
        reg.previous_champions = list(d["previous_champions"])
        reg.shadowed, reg.retired = set(d["shadowed"]), set(d["retired"])
        for e in d["history"]:
            entry = RolloutEntry.from_dict(e)
            reg.history.append(entry)
            for v in e.get("cards", [entry.version]):
                reg.versions[v].card.rollout_history.append(entry)
        return reg

    # -- model cards ------------------------------------------------------------------------

    def card_markdown(self, version: str) -> str:
        return card_markdown(self.get(version), self.role(version))


_LINE_BREAK = re.compile(r"\r\n|\r|\n")


def escaped(text: str) -> str:
    """`text` with each character a log or a terminal acts on (a line break, an ANSI escape) written as its
    escape: an actor or a note holding "\\n2026-12-06 ... INFO tipstream.models: models: promote v3 by alice"
    wrote a line the log's readers took for the service's own, and one holding ESC codes could rewrite what
    `tipstream models card` showed.

    >>> escaped("bob"), escaped("eve\\nINFO forged"), escaped("zoë"), escaped("\\x1b[2Jv9")
    ('bob', 'eve\\\\nINFO forged', 'zoë', '\\\\x1b[2Jv9')
    """
    return text if text.isprintable() else "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _whole(count: Any) -> str:
    """A count as the CLI's summary writes it, with thousands marks (`tipstream models evaluate`).

    >>> _whole(12345), _whole(7), _whole(None)
    ('12,345', '7', 'n/a')
    """
    return f"{count:,}" if isinstance(count, int) and not isinstance(count, bool) else _fmt(count)


def _fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    if isinstance(value, (list, tuple, dict)):
        value = json.dumps(value, default=str)
    # A line break ends a Markdown table's row: a note of two lines broke the rollout table off there.
    return escaped(_LINE_BREAK.sub("<br>", str(value).replace("|", "\\|")))


def _fmt_interval(bounds: Any) -> str:
    """
    >>> _fmt_interval([0.48223251981365894, 0.5716187862814766]), _fmt_interval(None)
    ('[0.4822, 0.5716]', 'n/a')
    """
    if not isinstance(bounds, (list, tuple)) or len(bounds) != 2:
        return _fmt(bounds)
    return f"[{_fmt(bounds[0])}, {_fmt(bounds[1])}]"


POLICY_VALUE_HEADING = "## Policy value (off-policy, from the logged propensities)"


def no_policy_value_yet(version: str) -> str:
    """Why a card evaluated with the policy value has none: said, where the card was silent right after the README's
    `shadow` then `evaluate`, and read as a version ready to promote on its offline metrics alone."""
    return (f"no rewarded decision of the log was served or shadowed by {version}. Once decisions it shadows or serves "
            f"have reactions, `{CLI} evaluate {version}` estimates it.")


def _policy_value_lines(report: dict[str, Any] | None, version: str) -> list[str]:
    """The off-policy estimates (app.evaluation.policy_value) as a table, when there are any, and the decisions
    no estimate could weigh."""
    if not report:  # a card of a release before the policy value, or of a version evaluated without one
        return []
    unweighed = report.get("skipped_without_propensity")
    # Said on the card: a log whose decisions were all logged without a usable propensity showed no section at
    # all, as if the version had never served, and one with some showed estimates over fewer without a word.
    left_out = [(f"{_whole(unweighed)} of the log's decisions (any version's) were left out of every estimate: logged "
                 "without a usable propensity (none, 0, above 1, or too small for its inverse to be a number), they "
                 "can weigh nothing (`skipped_without_propensity`).")] if unweighed else []
    if not ({"as_champion", "as_shadow"} & report.keys()):
        return ["", POLICY_VALUE_HEADING, "", f"None yet: {no_policy_value_yet(version)}",
                *(["", *left_out] if left_out else [])]
    lines = ["", POLICY_VALUE_HEADING, "",
             ("Mean reward of the tip served first: as logged (with exploration), and estimated (self-normalised "
              "inverse propensity scoring) had this version's own first choice been served, per decision that got "
              "a reaction (with TIPSTREAM_SILENCE_REWARD set, per decision served: one nobody reacted to counts at "
              "that reward, as does a first tip left alone while another got a reaction). Over the decisions the "
              "offline metrics' rewards come from: `decisions` counts those of them this version served (as champion) "
              "or shadowed, one each however many of its tips got a reaction, where the metrics' `n` counts rewarded "
              "tips of every version's decisions. As champion, the estimate leaves out decisions that could not have served its choice "
              "(propensity 0: only tied best tips of decisions logged before their `greedy` was); as shadow, it and "
              "the champion's beside it leave out every "
              "decision where not every tip could be served (`explore: false`, the greedy policy: under "
              "TIPSTREAM_POLICY=greedy a shadow cannot be estimated). "
              f"No interval (n/a) with an effective n under {MIN_EFFECTIVE_N} or rewards all alike."), "",
             ("| as | decisions | logged reward | estimate | 95% interval | agreed | effective n | left out "
              "| champion's best, same decisions: estimate [95% interval] (agreed) |"),
             "|---|---|---|---|---|---|---|---|---|"]
    for role, key in (("champion", "greedy"), ("shadow", "estimate")):
        part = report.get(f"as_{role}")
        if part:
            value, baseline = part.get(key) or {}, part.get("champion_greedy")
            lines.append(f"| {role} | {_whole(part.get('decisions'))} | {_fmt(part.get('logged_reward'))} | "
                         f"{_fmt(value.get('snips'))} | {_fmt_interval(value.get('ci95'))} | {_whole(value.get('agreed'))} | "
                         f"{_fmt(value.get('effective_n'))} | {_whole(value.get('skipped_unsupported'))} | "
                         f"{_baseline(baseline)} |")
    if left_out:
        lines += ["", *left_out]
    caveat = thompson_caveat(report)
    if caveat:
        lines += ["", f"**{caveat}**"]
    return lines


def thompson_caveat(report: dict[str, Any]) -> str | None:
    """What a shadow's estimate cannot show when its decisions were served by Thompson sampling.

    >>> print(thompson_caveat({"as_shadow": {"decisions": 40, "served_under_thompson": 30}}))
    As shadow, 30 of its 40 decisions were served by Thompson sampling: there, its choices that the champion and the popularity prior disfavour come first at propensities near 0, and its estimate leans towards the champion's, beyond its interval. Compare shadows while serving with epsilon-greedy (docs/learning.md, "Policy value").
    >>> thompson_caveat({"as_shadow": {"decisions": 40}}) is None
    True
    """
    shadow = report.get("as_shadow") or {}
    under = shadow.get("served_under_thompson")
    if not under:
        return None
    return (f"As shadow, {_whole(under)} of its {_whole(shadow.get('decisions'))} decisions were served by Thompson sampling: there, its "
            "choices that the champion and the popularity prior disfavour come first at propensities near 0, and its "
            "estimate leans towards the champion's, beyond its interval. Compare shadows while serving with "
            'epsilon-greedy (docs/learning.md, "Policy value").')


def _baseline(estimate: dict[str, Any] | None) -> str:
    """The champion's estimate beside a shadow's, with its interval and the decisions it rests on.

    >>> _baseline({"snips": 0.45, "ci95": [0.3, 0.6], "agreed": 9}), _baseline({"snips": 0.5, "ci95": None, "agreed": 2})
    ('0.45 [0.3, 0.6] (agreed 9)', '0.5 (agreed 2)')
    >>> _baseline(None)
    '-'
    """
    if not estimate:
        return "-"
    interval = f" {_fmt_interval(estimate['ci95'])}" if estimate.get("ci95") else ""
    return f"{_fmt(estimate.get('snips'))}{interval} (agreed {_whole(estimate.get('agreed'))})"


# `soft_rewards_learned` on a card: how its model learned a reward between 0 and 1 (`TipModel.soft_labels`).
SOFT_REWARDS_LEARNED = {True: "in one step, as a soft label", False: "as two weighted binary steps"}

METRICS_EXPLAINED = (
    "A fresh model with these parameters goes through the rewarded tips of the logged decisions (the newest "
    "TIPSTREAM_CARD_EVAL_MAX_REWARDS) in the order served, scoring each with only the rewards that had arrived by "
    "then and learning each reward as it arrived. `n`: those tips (a decision with two reactions counts two); "
    "`positives`: those "
    "with a reward of at least 0.5. `log_loss`: of the rewards as given (0.8, 0.3 are soft labels), lower is "
    "better; read it against `log_loss_base_rate`, predicting each reward by the mean of those before it: above "
    "it, the model's probabilities are worse than the mean's. `roc_auc`: the chance that a positive scores above "
    "a negative (0.5: no better than chance; ties count half). `mean_reward`, `mean_score`: the rewards' mean and "
    "the model's. `calibration_error`: over ten equal score bins, |mean score - mean reward| weighed by each "
    "bin's share (0: calibrated). `soft_rewards_learned`: how the model learned a reward between 0 and 1 (a "
    "logistic regression in one step of its log loss, (p - r) x; a factorisation machine, and a version trained "
    "before soft labels, as a positive of weight r and a negative of weight 1 - r). The fairness tables below "
    "give the same per segment.")


def older_metrics(metrics: dict[str, Any], version: str, kind: str = "logreg") -> str | None:
    """What a card's metrics computed by an older release do not mean as `METRICS_EXPLAINED` says, or None.
    Read back, such a card was explained as if computed now: by a release before 2026-12-05, its model may
    have learned each reward before the user's next decision (which reads higher than serving can do), its ROC
    AUC River's approximate one, and its calibration error the gap between the means.

    >>> older_metrics({"n": 40, "log_loss_base_rate": 0.6, "soft_rewards_learned": "in one step, as a soft label"}, "v1")
    >>> older_metrics({"n": 40, "log_loss_base_rate": 0.6}, "v2", "fm")  # two steps, before and since
    >>> print(older_metrics({"n": 40, "log_loss_base_rate": 0.6}, "v1"))
    Computed by a release that did not record how its model learned a reward between 0 and 1 (`soft_rewards_learned`): until 2026-12-07 (commit 2284055) a logistic regression learned one as two weighted binary steps, since in one step, as a soft label. `tipstream models evaluate v1` recomputes the card as described.
    """
    if not metrics.get("n") or "soft_rewards_learned" in metrics:
        return None
    again = f"`{CLI} evaluate {version}` recomputes the card as described."
    if "log_loss_base_rate" not in metrics:
        return ("Computed by a release before 2026-12-05 (commit 34bdf2e), not as described above: it has no "
                "`log_loss_base_rate` to read the log loss against; its model learned a reward between 0 and 1 as "
                "two weighted binary steps; and, by the release, before 2026-12-04 (158028c) its `roc_auc` is River's "
                "approximate one (50 thresholds), before 2026-12-03 its `calibration_error` is |mean score - mean "
                "reward| over all of them (a0be859) and its model learned each reward right after its decision, "
                "before the user's next one (ba9a936), which reads better than serving can do. " + again)
    if kind == "fm":
        return None
    return ("Computed by a release that did not record how its model learned a reward between 0 and 1 "
            "(`soft_rewards_learned`): until 2026-12-07 (commit 2284055) a logistic regression learned one as two "
            "weighted binary steps, since in one step, as a soft label. " + again)


# Said by the card and by `tipstream models evaluate` (`app.evaluation.rewarded_decisions` left them out).
DAMAGED_ROWS_LEFT_OUT = ("{} row(s) of the log (tip_scores) could not be read, the database holding them damaged: "
                         "left out of these metrics and of the policy value (`skipped_damaged_rows`; the service's "
                         "log names the first). A rebuild from the log writes them again.")


def card_markdown(mv: ModelVersion, role: str | None = None) -> str:
    """The model card as Markdown.

    >>> from datetime import datetime, timezone
    >>> mv = ModelVersion("v1", "logreg", {"learning_rate": 0.05}, ["hour_of_day"],
    ...     datetime(2026, 11, 26, tzinfo=timezone.utc),
    ...     ModelCard(inputs={"hour_of_day": "numeric, standard-scaled"},
    ...               offline_metrics={"n": 1000, "log_loss": 0.61234, "roc_auc": 0.7}))
    >>> print(card_markdown(mv, "champion"))  # doctest: +ELLIPSIS
    # Model card: v1
    <BLANKLINE>
    - Kind: logreg
    - Role: champion
    - Created: 2026-11-26T00:00:00+00:00
    <BLANKLINE>
    ## Parameters
    ...
    | log_loss | 0.6123 |
    ...
    """
    from models.validation import too_few  # models.validation imports models.reward, which imports this

    c = mv.card
    lines = [f"# Model card: {mv.version}", "", f"- Kind: {mv.kind}", f"- Role: {role or 'none'}",
             f"- Created: {mv.created_at.isoformat()}", ""]
    lines += ["## Parameters", "", "| parameter | value |", "|---|---|"]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in sorted(mv.shown_params.items())]
    lines += ["", "## Inputs", ""]
    if c.inputs:
        # An input's name may be a caller's (a candidate's own features): a '|' or a line break in it broke the table.
        lines += ["| input | use |", "|---|---|"] + [f"| {_fmt(k)} | {_fmt(v)} |" for k, v in sorted(c.inputs.items())]
    else:
        lines += [", ".join(mv.feature_names)
                  or f"(none when this card was written: the model had learned nothing; `{CLI} evaluate {mv.version}` "
                     "refreshes it)"]
    lines += ["", "## Offline metrics (progressive validation: predict, then learn, over the log)", ""]
    metrics = {k: v for k, v in c.offline_metrics.items() if k != "policy_value"}
    if metrics:
        # The policy value below says what its numbers mean; these were bare names, read by someone handed
        # the card without docs/learning.md (is n decisions or rewards? which calibration error?).
        lines += [METRICS_EXPLAINED, ""]
        lines += ["| metric | value |", "|---|---|"] + [f"| {k} | {_fmt(v)} |" for k, v in metrics.items()]
        few = too_few(metrics)
        if few:
            lines += ["", f"Too few to read: {few}. Positives are rewards of at least 0.5."]
        if damaged := metrics.get("skipped_damaged_rows"):
            lines += ["", DAMAGED_ROWS_LEFT_OUT.format(damaged)]
        older = older_metrics(metrics, mv.version, mv.kind)
        if older:
            lines += ["", f"**{older}**"]
    else:
        lines += ["(not evaluated)"]
    lines += _policy_value_lines(c.offline_metrics.get("policy_value"), mv.version)
    lines += ["", "## Fairness", ""]
    if not c.fairness:
        lines += ["(not checked)", ""]
    for name, report in c.fairness.items():
        lines += [f"### By {name}", ""]
        segments = (report.get("segments") or {}) if isinstance(report, dict) else {}
        metrics = ("n", "positives", "roc_auc", "log_loss", "calibration_error", "mean_reward")
        if segments:
            lines += ["| segment | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 1) + "|"]
            for seg, m in segments.items():
                lines.append(f"| {seg} | " + " | ".join(_fmt((m or {}).get(k)) for k in metrics) + " |")
        gaps = (report.get("max_gap") or {}) if isinstance(report, dict) else {}
        compared = report.get("compared") if isinstance(report, dict) else None
        if gaps and compared is not None and len(compared) < 2:
            lines += ["", (f"No gap to report: {len(compared)} segment(s) with at least "
                           f"{report.get('min_n', '?')} records ({', '.join(compared) or 'none'}); "
                           "a gap needs two.")]
        elif gaps:
            worst = report.get("worst") or {}
            lines += ["", "Largest gaps between segments with at least "
                      f"{report.get('min_n', '?')} records: "
                      + ", ".join(f"{k} {_fmt(v)}" + (f" (worst: {worst[k]})" if worst.get(k) else "")
                                  for k, v in gaps.items())]
        left_out = (report.get("auc_left_out") or {}) if isinstance(report, dict) else {}
        if left_out:
            lines += ["", "ROC AUC left out of the gap: "
                      + "; ".join(f"{seg} ({_fmt(why)})" for seg, why in left_out.items())]
        lines.append("")
    lines += ["## Rollout history", ""]
    if c.rollout_history:
        lines += ["| at | action | version | actor | note |", "|---|---|---|---|---|"]
        lines += [f"| {e.at.isoformat()} | {e.action} | {e.version} | {_fmt(e.actor)} | {_fmt(e.note)} |"
                  for e in c.rollout_history]
    else:
        lines += ["(none)"]
    return "\n".join(lines) + "\n"
