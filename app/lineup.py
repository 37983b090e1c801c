"""The lineup: the registry and the River models it names, as /score and the learner use them.

Everything here runs on the event loop but training over the log (`evaluate_log`, in a process
of its own); /score reads `champion` and `shadow`, the learner trains `learning` (every version
not retired, so that a shadow promoted or a champion rolled back to is up to date). A registry change is made on a copy, persisted in one SQL
transaction, and only then swapped in: a refused or failed change leaves the lineup as it was.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import multiprocessing
import os
from collections.abc import Awaitable, Callable
from concurrent.futures import ProcessPoolExecutor
from typing import Any

from sqlalchemy import Engine

from app import evaluation
from app.db import one_line
from app.decisions import decision_problem
from app.learning_metrics import CANDIDATE_CACHE, DIVERGED, REFUSED, SKIPPED
from app.log_setup import start_spawned
from app.registry_store import RegistryStore, UnreadableModel, UnreadableRegistry, decoded_model
from app.settings import POLICY_PARAMS
from app.start_errors import DAMAGED_DATABASE_FIXES, StartupError
from models.prior import PopularityPrior
from models.registry import FM_ONLY_PARAMETERS, ModelCard, ModelVersion, Registry, RegistryError, escaped
from models.reward import KINDS, TipModel
from models.validation import Diverged

# What a caller may send as a version's parameter meaning the exploration policy's.
EXPLORATION_PARAMETERS = frozenset({"policy", *(name for names in POLICY_PARAMS.values() for name in names)})

log = logging.getLogger("tipstream.models")
# What `register` takes in `params`: `kind` goes beside them (in them, the body's replaced it).
MODEL_PARAMETERS = tuple(p for p in inspect.signature(TipModel).parameters if p != "kind")


class RetiredModel:
    """What the lineup keeps of a retired version's model: no more than `GET /models` says of it.

    Retiring is for good (the registry refuses every role to a retired version), so its model will
    never score or learn again; kept whole, every version ever registered stayed in memory (and
    was loaded at every start), one model's weights each, tens of MB for a busy one."""

    __slots__ = ("n_learned",)
    users_held = None  # it forgets no one any more: not counted, as `tipstream_model_users` leaves it out
    diverged = False  # a retired version takes no role anyway

    def __init__(self, n_learned: int) -> None:
        self.n_learned = n_learned

    def describe_inputs(self) -> dict[str, str]:
        return {}  # its card's, as registered or last evaluated


class DatabaseNotOurs(RuntimeError):
    """A registry change refused: this service lost its database lock to another (`Lineup.refused` says so)."""


class Lineup:
    def __init__(self, store: RegistryStore, engine: Engine, *, eval_max_rewards: int,
                 silence_reward: float | None = None, log_level: str = "info") -> None:
        self.store, self.engine, self.eval_max_rewards = store, engine, eval_max_rewards
        self.log_level = log_level  # the evaluation process's (`Settings.log_level`): it logs as the service does
        self.silence_reward = silence_reward  # what a first tip nobody reacted to earns in a card's policy value
        self.registry = Registry()
        self.models: dict[str, TipModel | RetiredModel] = {}
        self.prior = PopularityPrior()
        self.champion_version = ""
        self.champion: TipModel = TipModel()
        self.shadow_version: str | None = None
        self.shadow: TipModel | None = None
        self.learning: list[tuple[str, TipModel]] = []
        self._lock = asyncio.Lock()
        self._stored_entries = 0
        # First-start settings that differ from the registered v1/v2 (`_unused_first_start`).
        self.first_start_unused: list[tuple[str, Any, Any]] = []
        # Checkpoint participants (the learner) whose state must be saved with a new version, and
        # the checkpointer's lock (`Checkpointer.lock`), held while that snapshot is saved.
        self.participants: list[Any] = []
        self.snapshot_lock = asyncio.Lock()
        # Users forgotten while a version is trained over the log, in order (`forget_user`): it may have
        # read their rows, and drops their features before it learns. Kept only while a training runs
        # (`_trainings`): kept for the whole run, every request to forget stayed in memory for good.
        self.forgotten: list[str] = []
        self._trainings = 0
        CANDIDATE_CACHE.set_function(lambda: self.champion.candidate_cache_items + (
            self.shadow.candidate_cache_items if self.shadow is not None else 0))
        # A checkpoint now (`Checkpointer.checkpoint`, set by the service): the rewards credited since
        # the last one reach `tip_scores` before a card is made from it (`_evaluated`).
        self.flush: Callable[[], Awaitable[Any]] | None = None
        # Awaited before each change is saved (the service's lock made sure of, `refused` set if another took it):
        # without, a change saved in the 10 s before the lock's check wrote over the roles of the service holding it.
        self.before_write: Callable[[], Awaitable[None]] | None = None
        self.refused: str | None = None  # why the database is no longer this service's: no change is saved

    # -- start -------------------------------------------------------------------------------

    def load(self, first_kind: str, shadow_kind: str | None = None, **model_params: Any) -> None:
        """Load the registry and models (worker thread, before serving); on the very first start,
        register `v1` as champion (and `v2` as shadow when `shadow_kind` is set), both with
        `model_params` (`TipModel`'s; `Settings.model_params`)."""
        try:
            registry, blobs = self.store.load()
        except UnreadableRegistry as error:  # a JSONDecodeError (or KeyError, ...) traceback named neither
            raise StartupError(f"{error}, then start tipstream again.") from None
        self.first_start_unused = [] if registry.champion is None else _unused_first_start(
            registry, first_kind, shadow_kind, model_params)
        if registry.champion is None:
            registry = Registry.from_dict(registry.to_dict())
            new: dict[str, tuple[bytes, int]] = {}
            for version, kind in (("v1", first_kind), ("v2", shadow_kind)):
                if kind is None or version in registry.versions:
                    continue
                model = TipModel(kind=kind, **model_params)
                registry.register(_version(version, model), actor="tipstream", note="first start")
                new[version] = (model.to_bytes(), 0)
            registry.bootstrap("v1", actor="tipstream")
            if shadow_kind is not None:
                registry.set_shadow("v2", actor="tipstream", note="first start")
            self.store.save(registry, known_entries=self.store.stored_entries(), new_models=new)
            registry, blobs = self.store.load()
        models: dict[str, TipModel | RetiredModel] = {}
        for version, mv in registry.versions.items():
            blob, n_learned = blobs.get(version, (None, 0))
            if version in registry.retired:
                models[version] = RetiredModel(n_learned)
            else:
                try:
                    models[version] = decoded_model(version, blob) if blob else TipModel(**mv.model_params)
                except UnreadableModel as error:  # an UnpicklingError (or ValueError, ...) traceback named neither
                    raise StartupError(
                        f"{error}, then start tipstream again. It does not start without that model: {version} is "
                        "not retired, so it serves or learns.") from None
        self.registry, self.models = registry, models
        self._stored_entries = len(registry.history)
        self._refresh()

    def _refresh(self) -> None:
        reg = self.registry
        assert reg.champion is not None
        models = self.models
        for version in reg.retired:
            model = models.get(version)
            if isinstance(model, TipModel):  # retired just now: its weights leave memory
                models[version] = RetiredModel(model.n_learned)
        self.champion_version, self.champion = reg.champion, self._model(reg.champion)
        self.shadow_version = reg.shadow
        self.shadow = self._model(reg.shadow) if reg.shadow is not None else None
        self.learning = [(v, m) for v, m in models.items() if isinstance(m, TipModel)]  # retired ones are not
        for version, _ in self.learning:
            # At 0 from when a version joins: `increase()` of a series that first appears at its first count
            # is 0, so the operator's guide's alerts on a diverged version or refused inputs missed the burst that
            # made it.
            for counter in (DIVERGED, SKIPPED, REFUSED):
                counter.labels(version)

    def forget_user(self, user_id: str) -> None:
        """Drop a user's own features from every version that learns (forgetting a user, `app/erasure.py`),
        and from those that join them after a training over the log that may have read their rows."""
        if self._trainings:
            self.forgotten.append(user_id)
        for _, model in self.learning:
            model.forget_user(user_id)

    def _forgotten_since(self, mark: int) -> set[str]:
        """The users forgotten after `len(self.forgotten)` was `mark`, and those being forgotten still
        (`Learner.erasing`: their rows may not be deleted yet, also those a start resumed)."""
        being = {user_id for participant in self.participants for user_id in getattr(participant, "erasing", ())}
        return being | set(self.forgotten[mark:])

    def _model(self, version: str) -> TipModel:
        model = self.models[version]
        assert isinstance(model, TipModel), f"{version} is retired"
        return model

    # -- changes (admin) ---------------------------------------------------------------------

    async def _change(self, apply: Callable[[Registry], Any], new_models: dict[str, TipModel] | None = None,
                      trained_on: evaluation.TrainedOn | None = None, forgotten_from: int | None = None,
                      retiring: str | None = None) -> Any:
        """Apply `apply` to a copy of the registry, persist it, then swap it in.

        A new model was trained on the rewards in SQL when it was read (`trained_on`). Steps:
        1. It learns the rewards the learner credited that it has not seen (their rows were not
           written yet, or came while it was trained), so it is as up to date as the others.
        2. Its bytes and the learner's state are saved in one transaction, so that a restart
           replays into it only feedback that comes after.
        3. It learns with the others while that transaction runs (and stops if it fails).

        A version `retiring` is saved with its rewards learned as of now: no checkpoint saves its model any
        more, and a restart showed the count of the last one before (seconds to minutes of rewards fewer)."""
        # Held for a retirement too, so that no snapshot taken before it (with that model) commits after it.
        async with self._lock, self.snapshot_lock if new_models or retiring else contextlib.nullcontext():
            staged = Registry.from_dict(self.registry.to_dict())
            result = apply(staged)
            new_models = new_models or {}
            if forgotten_from is not None:
                # Trained for seconds while a user was forgotten: it read their rows, and no forget reached it.
                for user_id in self._forgotten_since(forgotten_from):
                    for model in new_models.values():
                        model.forget_user(user_id)
            if trained_on is not None:
                examples = []
                for participant in self.participants:
                    examples += await participant.unseen_rewards(trained_on)
                for model in new_models.values():
                    for x, reward, rewarded_ms in examples:
                        model.learn_one(x, reward, rewarded_ms)
            if self.before_write is not None and self.refused is None:
                await self.before_write()
            if self.refused is not None:
                raise DatabaseNotOurs(f"{self.refused}; nothing changed: this service stops, make the change on the "
                                      "service that holds the database lock")
            # A frozen copy, serialised by the saving thread: a large model's bytes took ~100 ms of
            # the event loop (240k weights), the copy ~18 (`TipModel.frozen`).
            blobs = {v: (m.frozen(), m.n_learned) for v, m in new_models.items()}
            learned = {retiring: self._model(retiring).n_learned} if retiring is not None else {}
            extras = [(p, p.snapshot(force=True)) for p in self.participants] if new_models else []
            learning = self.learning
            self.learning = learning + list(new_models.items())
            saving = asyncio.ensure_future(asyncio.to_thread(
                self.store.save, staged, known_entries=self._stored_entries, new_models=blobs, extras=extras,
                learned=learned))
            cancelled = False
            while True:
                try:
                    await asyncio.shield(saving)
                    break
                except asyncio.CancelledError:
                    # The transaction goes on in its thread and may commit: wait for it, so that
                    # memory holds what SQL holds (else later changes are checked against stale
                    # roles and a restart could find, say, a retired champion).
                    if saving.cancelled():
                        self.learning = learning
                        raise
                    cancelled = True
                except BaseException:
                    self.learning = learning
                    raise
            for participant, snapshot in extras:
                participant.saved(snapshot)
            self.registry = staged
            # Said in the service's log too: what changed which version users are served by was in the
            # rollout history only, which no log search (or an operator tailing the log) reads.
            for entry in staged.history[self._stored_entries:]:
                log.info("models: %s %s by %s%s; champion %s, shadow %s", entry.action, entry.version,
                         escaped(entry.actor), f" ({escaped(entry.note)})" if entry.note else "", staged.champion or "-",
                         staged.shadow or "-")  # "-" as the CLI says it: Python's "None" is no version's name
            self._stored_entries = len(staged.history)
            self.models.update(new_models)
            # What was saved: the model may have learned more while the transaction ran, which no one reads again.
            self.models.update({v: RetiredModel(n) for v, n in learned.items()})
            self._refresh()
            if cancelled:
                raise asyncio.CancelledError
            return result

    async def register(self, version: str, kind: str, params: dict[str, Any], actor: str, note: str = "") -> ModelVersion:
        """A new version, trained over the decision log by progressive validation (its card's metrics)."""
        self.registry.check_new_name(version)  # before the training, which takes minutes on a long log
        unknown = sorted(set(params) - set(MODEL_PARAMETERS))
        exploring = [name for name in unknown if name in EXPLORATION_PARAMETERS]
        if exploring:
            # Azure Personalizer and bandit libraries tie exploration to the model; here it is the
            # service's, the same for every version, so the list of model parameters alone left the
            # engineer looking for it among them.
            raise RegistryError(
                f"{', '.join(map(repr, exploring))}: exploration is not a version's parameter but the service's, "
                "the same for every version: set TIPSTREAM_POLICY (epsilon_greedy, softmax, thompson, greedy) and "
                "its TIPSTREAM_POLICY_EPSILON, TIPSTREAM_POLICY_TEMPERATURE, TIPSTREAM_POLICY_THOMPSON_CELLS or "
                "TIPSTREAM_POLICY_THOMPSON_CONCENTRATION, and restart the service.", "invalid", "params")
        if unknown:
            raise RegistryError(f"Unknown model parameter {', '.join(map(repr, unknown))}; known: "
                                f"{', '.join(MODEL_PARAMETERS)}; the kind goes beside them (`kind`, the CLI's "
                                "`--kind`).", "invalid", "params")
        if kind not in KINDS:  # the body's own field, not one of its params
            raise RegistryError(f"kind must be one of {', '.join(KINDS)}; got {kind!r}", "invalid", "kind")
        try:
            TipModel(**{**params, "kind": kind})
        except (TypeError, ValueError) as error:
            raise RegistryError(f"Model parameters are not valid: {error}", "invalid", "params") from error
        ignored = _ignored_parameters(kind, params)
        if ignored:
            raise RegistryError(f"Model parameters are not valid: {ignored}", "invalid", "params")
        forgotten_from = len(self.forgotten)
        self._trainings += 1
        try:
            model, card, trained_on = await self._evaluated({**params, "kind": kind})
            mv = _version(version, model, card)
            await self._change(lambda reg: reg.register(mv, actor=actor, note=note), {version: model}, trained_on,
                               forgotten_from)
        finally:
            self._trainings -= 1
            if not self._trainings:  # no mark into it is left
                self.forgotten.clear()
        return self.registry.get(version)

    async def set_shadow(self, version: str, actor: str, note: str = "") -> None:
        def apply(reg: Registry) -> None:
            self._refuse_diverged(version, "shadow")
            reg.set_shadow(version, actor=actor, note=note)

        await self._change(apply)

    async def promote(self, version: str, actor: str, note: str = "") -> None:
        def apply(reg: Registry) -> None:
            self._refuse_diverged(version, "promote")
            reg.promote(version, actor=actor, note=note)

        await self._change(apply)

    def _refuse_diverged(self, version: str, doing: str) -> None:
        """A champion that scores NaN leaves /score ranking by the popularity prior: promoting one
        "succeeded", and the model it replaced stopped serving for nothing."""
        model = self.models.get(version)
        if model is not None and model.diverged:
            raise RegistryError(
                f"Version {version!r} has diverged (a learning step overflowed its weights; it scores NaN), so it "
                f"cannot {doing}. Retire it and register a version with a smaller learning_rate.")

    async def rollback(self, actor: str, note: str = "", champion: str | None = None) -> str:
        def apply(reg: Registry) -> str:
            # Checked on the registry it applies to, under the lock: checked before waiting for it, a
            # promote that waited ahead (of v1, say) pushed another version (v2, diverged) on the stack,
            # and the rollback restored that one.
            if reg.previous_champions and champion in (None, reg.champion):  # else the registry says
                self._refuse_diverged(reg.previous_champions[-1], "be rolled back to")
            return reg.rollback(actor=actor, note=note, champion=champion)

        return await self._change(apply)

    async def retire(self, version: str, actor: str, note: str = "") -> None:
        # Only one that is learning has a count to save: a retired one is refused by the registry.
        live = isinstance(self.models.get(version), TipModel)
        await self._change(lambda reg: reg.retire(version, actor=actor, note=note), retiring=version if live else None)

    async def evaluate(self, version: str, actor: str, note: str = "") -> ModelCard:
        """Refresh a version's card: progressive validation of its configuration over the log,
        and the off-policy value of its choices where it served or shadowed."""
        mv = self.registry.get(version)
        # Learning soft rewards as the version does: a version trained before soft labels learns 0.8 as two
        # weighted steps (`TipModel.soft_labels`), and a fresh model of its parameters measured one-step learning.
        model = self.models.get(version)
        _, card, _ = await self._evaluated(mv.model_params, version,
                                           model.soft_labels if isinstance(model, TipModel) else None)
        return await self._change(lambda reg: reg.refresh_card(
            version, actor, note, inputs=self.models[version].describe_inputs() or card.inputs,
            offline_metrics=card.offline_metrics, fairness=card.fairness))

    async def _evaluated(self, params: dict[str, Any], version: str | None = None,
                         soft_labels: bool | None = None) -> tuple[TipModel, ModelCard, evaluation.TrainedOn]:
        """`evaluate_log` over this lineup's database, in a process of its own.

        Not in a thread: training over the log creates a latent vector (FM) or reads a row
        (SQLite, psycopg) with the GIL released for an instant, again and again, and CPython
        asks a thread for the GIL only when it has not changed hands for 5 ms: the event loop
        waited up to 1.2 s for it while an FM trained on 50k rewards of 20k users, and /score
        with it. An in-memory SQLite database, which no other process can open, stays in a thread.

        The log is checkpointed first: registered or evaluated within a checkpoint's interval of a
        burst of feedback, a card read "no rewarded decisions in the log yet" (n 0) beside a
        model that had learned them all."""
        if self.flush is not None:
            try:
                await self.flush()
            except Exception as error:  # noqa: BLE001 - the checkpointer retries; the card reads what SQL has
                log.warning("a checkpoint before reading the log failed (%s); the card leaves out the rewards "
                            "since the last one", one_line(error, self.engine.url))
        url = self.engine.url
        if url.get_backend_name() == "sqlite" and url.database in (None, "", ":memory:"):
            model, card, trained = await asyncio.to_thread(evaluate_log, self.engine, self.eval_max_rewards, params,
                                                           version, self.silence_reward, soft_labels)
        else:
            # spawn: a fork of a process with an event loop and threads is not safe.
            pool = ProcessPoolExecutor(1, multiprocessing.get_context("spawn"), initializer=start_spawned,
                                       initargs=(os.getpid(), self.log_level))
            try:
                blob, card, trained = await asyncio.get_running_loop().run_in_executor(
                    pool, _evaluate_at, url.render_as_string(hide_password=False), self.eval_max_rewards, params,
                    version, self.silence_reward, soft_labels)
            finally:
                pool.shutdown(wait=False, cancel_futures=True)
            model = TipModel.from_bytes(blob)
        if trained.first_damaged is not None:
            decision_id, why = trained.first_damaged
            log.warning("the card's evaluation over the decision log left out %d tip_scores row(s) that cannot be "
                        "read (the first: decision %r, %s): the database holds them damaged. %s.",
                        card.offline_metrics.get("skipped_damaged_rows", 1), decision_id, why,
                        DAMAGED_DATABASE_FIXES)
        return model, card, trained

    # -- reads -------------------------------------------------------------------------------

    def describe(self, version: str) -> dict[str, Any]:
        mv = self.registry.get(version)
        model = self.models.get(version)
        return mv.shown() | {"role": self.registry.role(version), **_learned(model)}

    def listing(self) -> list[dict[str, Any]]:
        return [{"version": v, "kind": mv.kind, "role": self.registry.role(v),
                 "created_at": mv.created_at.isoformat(), **_learned(self.models.get(v))}
                for v, mv in self.registry.versions.items()]


def _learned(model: TipModel | RetiredModel | None) -> dict[str, Any]:
    """Rewards learned, and the users whose own weights the model holds (`TipModel.users_held`)."""
    if model is None:
        return {"n_learned": 0, "users_held": None}
    return {"n_learned": model.n_learned, "users_held": model.users_held}


def _ignored_parameters(kind: str, params: dict[str, Any]) -> str:
    """Why some given parameters would change nothing, or "": registered, a logreg with n_factors=4
    learned as any logreg, as if the 4 counted.

    >>> _ignored_parameters("logreg", {"n_factors": 4, "learning_rate": 0.1})
    "n_factors applies only to kind 'fm' (this is a 'logreg'); leave it out or register with kind fm"
    >>> _ignored_parameters("fm", {"optimizer": "sgd", "user_forgetting": 0.5})
    "user_forgetting applies only to optimizer 'adagrad' (this one learns with 'sgd'); leave it out"
    >>> _ignored_parameters("fm", {"n_factors": 4, "user_forgetting": 0.5})
    ''
    """
    if kind != "fm":
        given = [p for p in FM_ONLY_PARAMETERS if p in params]
        if given:
            return (f"{', '.join(given)} {'applies' if len(given) == 1 else 'apply'} only to kind 'fm' (this is a "
                    f"{kind!r}); leave {'it' if len(given) == 1 else 'them'} out or register with kind fm")
    if "user_forgetting" in params and params.get("optimizer") == "sgd":
        return "user_forgetting applies only to optimizer 'adagrad' (this one learns with 'sgd'); leave it out"
    return ""


def _unused_first_start(registry: Registry, first_kind: str, shadow_kind: str | None,
                        model_params: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """What the first start's settings ask for that the registered `v1` (or `v2`) is not: the
    settings are read on the first start only, so a later change to them changes nothing.
    `(parameter, configured, registered)`; "shadow_kind" for the shadow's kind."""
    unused = []
    v1 = registry.versions.get("v1")
    if v1 is not None:
        wanted = TipModel(kind=first_kind, **model_params).params
        for name in ("kind", *model_params):
            if wanted[name] != v1.model_params.get(name):
                unused.append((name, wanted[name], v1.model_params.get(name)))
    v2 = registry.versions.get("v2")
    if shadow_kind is not None and (v2 is None or v2.kind != shadow_kind):
        unused.append(("shadow_kind", shadow_kind, None if v2 is None else v2.kind))
    return unused


def _version(version: str, model: TipModel, card: ModelCard | None = None) -> ModelVersion:
    return ModelVersion(version, model.params["kind"], dict(model.params), model.feature_names,
                        card=card or ModelCard(inputs=model.describe_inputs()))


def evaluate_log(engine: Engine, limit: int, params: dict[str, Any], version: str | None = None,
                 silence_reward: float | None = None,
                 soft_labels: bool | None = None) -> tuple[TipModel, ModelCard, evaluation.TrainedOn]:
    """A model of `params` trained over the newest `limit` rewarded decisions, its card, and what
    it trained on; with `version`, the card also gets the version's off-policy value (a first tip
    nobody reacted to at `silence_reward`, `evaluation.policy_value`). `soft_labels`: how the model
    learns a reward between 0 and 1 (`evaluation.evaluate`)."""
    read = evaluation.rewarded_decisions(engine, limit)
    decisions = read.decisions
    # Rows written before decisions read back were checked for what a card reads (a list as a feature
    # value, a shadow as text: `decisions.decision_problem`) failed every card for as long as they were
    # among the newest. Left out, and counted as seen (`trained_on`): a registration must not learn them.
    usable = [d for d in decisions if decision_problem(d[0]) is None]
    # The policy value reads the decisions the examples come from: over all of them it reached further back than
    # the metrics beside it when the oldest examples were cut (more than `limit`: decisions with several rewards).
    examples, reached = evaluation.card_slice(usable, limit)
    try:
        model, card = evaluation.evaluate(params, examples, soft_labels=soft_labels)
    except Diverged as error:
        resolved = TipModel(**params).params
        steps = ", ".join(f"{name} {resolved[name]:g}" for name in ("learning_rate", "intercept_lr", "l2"))
        raise RegistryError(
            f"The model overflowed learning the logged rewards ({error}): its steps ({steps}) are too large "
            "for its weights; register a version with a smaller learning_rate.", "invalid", "params") from None
    if read.damaged:  # left out of the metrics and the policy value alike
        card.offline_metrics["skipped_damaged_rows"] = read.damaged
    if version is not None:
        card.offline_metrics["policy_value"] = evaluation.policy_value(reached, version, silence_reward)
    return model, card, evaluation.trained_on(decisions, limit - read.damaged, read.first_damaged)


def _evaluate_at(database_url: str, limit: int, params: dict[str, Any], version: str | None,
                 silence_reward: float | None, soft_labels: bool | None) -> tuple[bytes, ModelCard, evaluation.TrainedOn]:
    """`evaluate_log` in the evaluation process: the model goes back as its bytes."""
    from app.db import make_engine

    engine = make_engine(database_url)
    try:
        model, card, trained = evaluate_log(engine, limit, params, version, silence_reward, soft_labels)
    finally:
        engine.dispose()
    return model.to_bytes(), card, trained
