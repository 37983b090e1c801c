"""Model registry rules, persistence and model cards (models/registry.py)."""

from __future__ import annotations

import json
import random
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, seed, settings
from hypothesis import strategies as st

from app.registry_store import roles_from_history
from models.registry import ModelCard, ModelVersion, Registry, RegistryError, RolloutEntry, card_markdown
from models.reward import TipModel
from models.validation import fairness_check, progressive_validation, tenure_segment, timezone_segment

T0 = datetime(2026, 11, 26, 8, 0, tzinfo=UTC)


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        self.now += timedelta(minutes=1)
        return self.now


def _version(name: str) -> ModelVersion:
    return ModelVersion(name, "logreg", {"learning_rate": 0.05, "interactions": [["category", "hour_of_day"]]},
                        ["hour_of_day", "tip_id"], T0)


@pytest.fixture
def reg() -> Registry:
    r = Registry(clock=Clock())
    for v in ("v1", "v2", "v3"):
        r.register(_version(v), actor="ci")
    r.bootstrap("v1", actor="alice")
    return r


def test_promote_without_shadow_is_refused_and_says_what_to_do(reg: Registry) -> None:
    before = list(reg.history)
    with pytest.raises(RegistryError) as err:
        reg.promote("v3", actor="alice")
    assert str(err.value) == "Version 'v3' has not run as shadow; run `tipstream models shadow v3` first."
    assert err.value.code == "conflict"
    assert reg.champion == "v1" and reg.history == before  # nothing half-applied


def test_shadow_then_promote_then_rollback_restores_the_champion(reg: Registry) -> None:
    reg.set_shadow("v2", actor="alice")
    assert (reg.champion, reg.shadow) == ("v1", "v2")
    reg.promote("v2", actor="bob", note="better AUC")
    assert (reg.champion, reg.shadow) == ("v2", None)
    assert reg.role("v1") is None and reg.role("v2") == "champion"
    assert reg.rollback(actor="carol") == "v1"
    assert reg.champion == "v1"
    last = reg.history[-1]
    assert (last.action, last.version, last.actor, last.note) == ("rollback", "v1", "carol", "from v2")


def test_a_promotion_or_rollback_with_a_note_still_records_the_champion_it_replaces(reg: Registry) -> None:
    """With a note (`--note`, the API's `note`), the record held the note alone: the rollout history, and the card of
    the version promoted, no longer said which champion it replaced, nor a rollback which it undid."""
    reg.set_shadow("v2", actor="alice")
    reg.promote("v2", actor="bob", note="better AUC")
    assert reg.history[-1].note == "replaces champion v1; better AUC"
    assert reg.get("v2").card.rollout_history[-1].note == "replaces champion v1; better AUC"
    reg.rollback(actor="carol", note="AUC dropped")
    assert reg.history[-1].note == "from v2; AUC dropped"


def test_rollbacks_walk_back_through_earlier_champions(reg: Registry) -> None:
    for v in ("v2", "v3"):
        reg.set_shadow(v, actor="a")
        reg.promote(v, actor="a")
    assert reg.rollback(actor="a") == "v2"
    assert reg.rollback(actor="a") == "v1"
    with pytest.raises(RegistryError, match="no earlier champion to roll back to; promote a shadowed version"):
        reg.rollback(actor="a")
    assert reg.champion == "v1"


def test_a_rollback_never_restores_the_champion_itself(reg: Registry) -> None:
    from app.registry_store import roles_from_history

    reg.set_shadow("v2", actor="a")
    reg.promote("v2", actor="a")
    reg.set_shadow("v1", actor="a")
    reg.promote("v1", actor="a")  # v1 again: before, it stayed in the stack below v2
    reg.retire("v2", actor="a")
    assert reg.previous_champions == []
    with pytest.raises(RegistryError, match="no earlier champion"):  # before: "rollback v1 from v1"
        reg.rollback(actor="a")
    replayed = roles_from_history(reg.history)  # a restart reads the same roles
    assert (replayed.champion, replayed.previous_champions) == (reg.champion, reg.previous_champions)


def test_a_version_that_shadowed_before_can_be_promoted_again(reg: Registry) -> None:
    reg.set_shadow("v2", actor="a")
    reg.promote("v2", actor="a")
    reg.rollback(actor="a")
    reg.promote("v2", actor="a")  # it has run as shadow
    assert reg.champion == "v2"


def test_bootstrap_only_for_the_first_champion(reg: Registry) -> None:
    with pytest.raises(RegistryError, match="already a champion .'v1'.; shadow 'v2' with `tipstream models shadow v2`"):
        reg.bootstrap("v2", actor="a")
    entry = reg.get("v1").card.rollout_history[-1]
    assert entry.action == "promote" and "initial champion" in entry.note


def test_shadow_rules(reg: Registry) -> None:
    with pytest.raises(RegistryError, match="'v1' is the champion; shadow a different version"):
        reg.set_shadow("v1", actor="a")
    reg.set_shadow("v2", actor="a")
    with pytest.raises(RegistryError, match="already the shadow"):
        reg.set_shadow("v2", actor="a")
    reg.set_shadow("v3", actor="a")
    assert reg.shadow == "v3"
    # The replaced shadow's card records that it stopped shadowing.
    assert reg.get("v2").card.rollout_history[-1].note == "replaces shadow v2"
    assert reg.get("v2").card.rollout_history[-1] is reg.get("v3").card.rollout_history[-1]


def test_retire(reg: Registry) -> None:
    with pytest.raises(RegistryError, match="'v1' is the champion; promote another .* `tipstream models rollback`"):
        reg.retire("v1", actor="a")
    reg.set_shadow("v2", actor="a")
    reg.promote("v2", actor="a")
    reg.set_shadow("v3", actor="a")
    reg.retire("v3", actor="a")
    assert reg.shadow is None and reg.role("v3") == "retired"
    reg.retire("v1", actor="a")  # leaves the rollback stack
    with pytest.raises(RegistryError, match="no earlier champion"):
        reg.rollback(actor="a")
    for action in (reg.set_shadow, reg.promote):
        with pytest.raises(RegistryError, match="'v3' is retired .* register a new version instead"):
            action("v3", actor="a")
    with pytest.raises(RegistryError, match="^Version 'v3' is already retired; there is nothing to do.$"):
        reg.retire("v3", actor="a")


def test_a_name_that_differs_from_a_version_only_in_case_is_named_and_refused_as_new(reg: Registry) -> None:
    """Names are exact: `promote V2` with v2 registered said only "unknown", beside a list holding v2; and V2
    could be registered beside v2, each then taken for the other."""
    with pytest.raises(RegistryError, match="^No model version 'V2'; did you mean 'v2'[?] Version names are "
                                            "case-sensitive.$") as err:
        reg.set_shadow("V2", actor="a")
    assert (err.value.code, err.value.field) == ("not_found", "version")
    with pytest.raises(RegistryError, match="^Version 'V1' differs from the registered 'v1' only in case; ") as err:
        reg.register(_version("V1"), actor="ci")
    assert (err.value.code, err.value.field) == ("conflict", "version")
    assert "V1" not in reg.versions and reg.role("v2") is None


def test_unknown_duplicate_and_invalid(reg: Registry) -> None:
    with pytest.raises(RegistryError, match="Unknown model version 'v9' .known: v1, v2, v3.; list them with `tipstream models list`") as err:
        reg.set_shadow("v9", actor="a")
    assert err.value.code == "not_found"
    with pytest.raises(RegistryError, match="already registered"):
        reg.register(_version("v1"), actor="ci")
    with pytest.raises(RegistryError, match="not valid") as err:
        reg.register(_version(" v4"), actor="ci")
    assert err.value.code == "invalid"
    with pytest.raises(RegistryError, match="needs an actor"):
        reg.set_shadow("v2", actor=" ")
    assert reg.shadow is None


def test_every_change_lands_in_the_history_with_time_and_actor(reg: Registry) -> None:
    reg.set_shadow("v2", actor="bob")
    reg.promote("v2", actor="bob")
    actions = [(e.action, e.version, e.actor) for e in reg.history]
    assert actions == [("register", "v1", "ci"), ("register", "v2", "ci"), ("register", "v3", "ci"),
                       ("promote", "v1", "alice"), ("shadow", "v2", "bob"), ("promote", "v2", "bob")]
    times = [e.at for e in reg.history]
    assert times == sorted(times) and len(set(times)) == len(times)
    # A promotion changes two versions' roles, so it lands on both cards.
    assert [e.action for e in reg.get("v1").card.rollout_history] == ["register", "promote", "promote"]
    assert reg.get("v1").card.rollout_history[-1].note == "replaces champion v1"


def test_json_round_trip_keeps_roles_history_and_cards(reg: Registry) -> None:
    reg.set_shadow("v2", actor="a")
    reg.promote("v2", actor="a")
    reg.set_shadow("v3", actor="a")
    copy = Registry.from_dict(json.loads(json.dumps(reg.to_dict())), clock=Clock())
    assert (copy.champion, copy.shadow, copy.previous_champions) == ("v2", "v3", ["v1"])
    assert copy.history == reg.history
    for v in ("v1", "v2", "v3"):
        assert copy.get(v) == reg.get(v)
    assert copy.get("v1").params["interactions"] == [["category", "hour_of_day"]]
    copy.promote("v3", actor="a")  # shadowed state survived too
    assert copy.rollback(actor="a") == "v2"


def test_a_version_registered_before_optimizers_existed_is_rebuilt_as_it_was_trained(reg: Registry) -> None:
    copy = Registry.from_dict(json.loads(json.dumps(reg.to_dict())), clock=Clock())  # params without "optimizer"
    assert "optimizer" not in copy.get("v1").params  # the record reads back as it was
    rebuilt = TipModel(**copy.get("v1").model_params).params
    assert (rebuilt["optimizer"], rebuilt["latents"], rebuilt["user_forgetting"]) == ("sgd", "all", 0.0)


@pytest.mark.parametrize("kind", ["logreg", "fm"])
def test_the_card_and_show_list_only_the_parameters_the_kind_reads(kind: str) -> None:
    model = TipModel(kind=kind)  # every kind's params hold n_factors, seed and latents: they rebuild it
    mv = ModelVersion("m-1", kind, model.params, model.feature_names, T0)
    md, shown = card_markdown(mv), mv.shown()["params"]
    for fm_only in ("n_factors", "seed", "latents"):
        assert (f"| {fm_only} |" in md, fm_only in shown) == (kind == "fm",) * 2
    assert "| learning_rate |" in md and "learning_rate" in shown
    assert TipModel(**mv.model_params).params == model.params  # still rebuilt whole


def test_model_card_from_a_real_model() -> None:
    rng = random.Random(0)
    stream = []
    for _ in range(600):
        new = rng.random() < 0.3
        cat = rng.choice(("focus", "breaks"))
        x = {"tip_id": f"tip-{cat}", "category": cat, "hour_of_day": rng.randrange(24),
             "seconds_since_active": 9e6 if new else 60.0, "utc_offset_min": rng.choice((-300, 60, 540))}
        stream.append((x, float(rng.random() < (0.7 if cat == "focus" else 0.2))))
    model, records = TipModel(), []
    metrics = progressive_validation(model, stream, records=records)
    fairness = {"tenure": fairness_check(records, tenure_segment), "timezone": fairness_check(records, timezone_segment)}
    card = ModelCard(inputs=model.describe_inputs(), offline_metrics=metrics, fairness=fairness)
    reg = Registry(clock=Clock())
    reg.register(ModelVersion("m-1", model.params["kind"], model.params, model.feature_names, T0, card), actor="ci")
    reg.bootstrap("m-1", actor="ops")
    md = reg.card_markdown("m-1")
    assert md.startswith("# Model card: m-1\n")
    assert "- Role: champion" in md
    assert f"| roc_auc | {metrics['roc_auc']:.4g} |" in md
    assert "| tip_id | categorical, one-hot |" in md
    assert "### By tenure" in md and "| new | " in md and "| established | " in md
    assert "### By timezone" in md and "| apac | " in md
    assert "Largest gaps between segments with at least 30 records: roc_auc" in md
    assert "| promote | m-1 | ops | initial champion" in md
    json.dumps(reg.to_dict())  # the whole card, metrics included, is JSON-ready for SQL


def test_a_fairness_check_with_one_segment_large_enough_says_there_is_no_gap() -> None:
    records = [({"is_new_user": True}, float(i % 2), 0.5) for i in range(40)]
    records += [({"is_new_user": False, "seconds_since_active": 60.0}, 1.0, 0.5)] * 3
    card = ModelCard(fairness={"tenure": fairness_check(records, tenure_segment)})
    md = card_markdown(ModelVersion("m", "logreg", {}, [], T0, card))
    assert "No gap to report: 1 segment(s) with at least 30 records (new); a gap needs two." in md
    assert "Largest gaps" not in md


def test_the_card_says_why_a_segment_s_auc_is_left_out_of_the_gap() -> None:
    records = [({"utc_offset_min": -300}, float(i % 2), 0.2 + 0.6 * (i % 2)) for i in range(60)]
    records += [({"utc_offset_min": 60}, float(i % 2), 0.5) for i in range(60)]
    records += [({"utc_offset_min": 540}, 0.0, 0.5)] * 29 + [({"utc_offset_min": 540}, 1.0, 0.1)]
    card = ModelCard(fairness={"timezone": fairness_check(records, timezone_segment)})
    md = card_markdown(ModelVersion("m", "logreg", {}, [], T0, card))
    assert "| segment | n | positives | roc_auc |" in md and "| apac | 30 | 1 | 0 |" in md
    assert ("ROC AUC left out of the gap: apac (1 positive and 29 negatives: ROC AUC needs 10 of each)"
            in md)
    assert "roc_auc 0.5 (worst: emea)" in md


def test_card_of_an_unevaluated_version() -> None:
    md = card_markdown(ModelVersion("bare", "fm", {}, [], T0))
    for text in ("- Role: none", "the model had learned nothing; `tipstream models evaluate bare` refreshes it",
                 "(not evaluated)", "(not checked)\n\n## Rollout history\n\n(none)"):
        assert text in md
    assert "\n\n\n" not in md


def test_rollout_entry_round_trip() -> None:
    e = RolloutEntry(T0, "shadow", "v1", "alice", "note with | pipe")
    assert RolloutEntry.from_dict(json.loads(json.dumps(e.to_dict()))) == e


def test_a_card_with_null_parts_still_renders() -> None:
    """A card edited by hand, or written by an older release, may hold nulls where a report was."""

    card = ModelCard.from_dict({"inputs": None, "offline_metrics": {"n": 3, "policy_value": {
        "as_shadow": {"decisions": 3, "logged_reward": 0.5, "estimate": None, "champion_greedy": None}}},
        "fairness": {"tenure": {"segments": {"new": None}, "max_gap": {"roc_auc": 0.1}, "worst": None,
                                "compared": ["new", "established"]}}})
    text = ModelVersion("v9", "logreg", {}, [], T0, card).to_dict()
    markdown = card_markdown(ModelVersion.from_dict(text))
    assert "| shadow | 3 | 0.5 | n/a |" in markdown and "| new | n/a |" in markdown


def test_the_card_s_policy_value_says_what_it_is_per_with_silence_learned_too() -> None:
    """The card said "per decision that got a reaction" only: with TIPSTREAM_SILENCE_REWARD set, the
    decisions nobody reacted to are in at that reward, and the value is per decision served (docs/operations.md,
    "Tips nobody reacts to")."""
    card = ModelCard.from_dict({"offline_metrics": {"n": 3, "policy_value": {
        "as_champion": {"decisions": 3, "logged_reward": 0.5, "greedy": {"snips": 0.5}}}}})
    markdown = card_markdown(ModelVersion("v9", "logreg", {}, [], T0, card))
    assert "per decision that got a reaction (with TIPSTREAM_SILENCE_REWARD set, per decision served" in markdown


VERSIONS = ("v1", "v2", "v3")
CHANGES = st.lists(st.tuples(st.sampled_from(("bootstrap", "set_shadow", "promote", "rollback", "retire")),
                             st.sampled_from(VERSIONS)), max_size=25)


@seed(0)
@settings(max_examples=400, deadline=None)
@given(CHANGES)
def test_the_stored_history_replays_into_the_roles_the_registry_holds(changes: list[tuple[str, str]]) -> None:
    """The SQL store loads roles by replaying the history (`roles_from_history`); any sequence of
    changes, refused ones included, must replay into what the registry held when it saved them.
    A shadow bootstrapped as champion stayed the shadow too in memory, and was not after a restart."""
    reg = Registry()
    for v in VERSIONS:
        reg.register(ModelVersion(v, "logreg", {}, []), actor="ci")
    for action, version in changes:
        try:
            if action == "rollback":
                reg.rollback(actor="ops")
            else:
                getattr(reg, action)(version, actor="ops")
        except RegistryError:
            pass
        assert reg.champion is None or reg.champion != reg.shadow
    roles = roles_from_history(reg.history)
    assert (roles.champion, roles.shadow, roles.previous_champions, roles.shadowed, roles.retired) == (
        reg.champion, reg.shadow, reg.previous_champions, reg.shadowed, reg.retired)


def test_a_note_of_several_lines_stays_in_its_row_of_the_rollout_table(reg: Registry) -> None:
    """A line break ends a Markdown table's row: the rest of a two-line note (the admin API takes
    any text) was a line of its own, a heading here, and the rows after it fell out of the table."""
    reg.set_shadow("v2", actor="bob|ops", note="after review\r\n## approved\rby ops\nticket 7")
    md = reg.card_markdown("v2")
    table = md[md.index("| at | action |"):].split("\n\n")[0].strip().split("\n")
    assert all(line.startswith("|") and line.endswith("|") for line in table), table
    assert "| bob\\|ops | after review<br>## approved<br>by ops<br>ticket 7 |" in table[-1]


def test_a_note_holding_terminal_escapes_is_shown_as_text(reg: Registry) -> None:
    """`tipstream models card` prints what admins wrote to a terminal: ESC codes in a note (clear the
    screen, move the cursor) could rewrite what the card showed, a champion's metrics among them."""
    reg.set_shadow("v2", actor="eve\x1b[1A", note="fine\x1b[2J\x1b[Hv9 is champion\x07")
    md = reg.card_markdown("v2")
    assert "\x1b" not in md and "\x07" not in md
    assert "| eve\\x1b[1A | fine\\x1b[2J\\x1b[Hv9 is champion\\x07 |" in md


def test_an_input_named_by_a_caller_stays_in_its_row_of_the_inputs_table() -> None:
    """A candidate's own feature names are the caller's: one holding a '|' or a line break split its row."""
    model = TipModel()
    model.learn_one({"tip_id": "a", "len|gth": 2.0, "two\nlines": "x"}, 1.0)
    mv = ModelVersion("v1", "logreg", {}, model.feature_names, datetime(2026, 11, 26, tzinfo=UTC),
                      ModelCard(inputs=model.describe_inputs()))
    md = card_markdown(mv)
    table = md[md.index("| input | use |"):].split("\n\n")[0].strip().split("\n")
    assert all(line.startswith("|") and line.count(" | ") == 1 for line in table[2:]), table
    assert any(line.startswith("| len\\|gth | ") for line in table) and any("two<br>lines" in line for line in table)


def test_the_card_gives_the_champion_s_estimate_beside_a_shadow_s_with_its_interval() -> None:
    """docs/operations.md, "Managing model versions": beside the shadow's estimate is the champion's on the same
    decisions, each with an interval; the card showed the champion's value alone."""
    estimate = {"snips": 0.9, "ci95": [0.8, 0.95], "agreed": 58, "effective_n": 58.0, "skipped_unsupported": 0}
    card = ModelCard.from_dict({"offline_metrics": {"n": 60, "policy_value": {"as_shadow": {
        "decisions": 60, "logged_reward": 0.88, "estimate": estimate,
        "champion_greedy": {**estimate, "snips": 0.85, "ci95": [0.7, 0.92], "agreed": 59}}}}})
    markdown = card_markdown(ModelVersion("v9", "logreg", {}, [], T0, card), "shadow")
    assert "| shadow | 60 | 0.88 | 0.9 | [0.8, 0.95] | 58 | 58 | 0 | 0.85 [0.7, 0.92] (agreed 59) |" in markdown


@pytest.mark.parametrize("with_estimate", [True, False])
def test_decisions_without_a_usable_propensity_are_counted_on_the_card_and_in_the_summary(with_estimate: bool) -> None:
    """`policy_value` counts the decisions it could not weigh (`skipped_without_propensity`); the card and the
    CLI's summary dropped the count: with every decision so logged there was no policy value section at all,
    as if the version had never served, and with some the estimates rested on fewer without a word."""
    from app.models_cli import _card_summary

    value: dict = {"source": "inverse propensity scoring", "skipped_without_propensity": 7}
    if with_estimate:
        value["as_champion"] = {"decisions": 3, "logged_reward": 0.5, "greedy": {"snips": 0.5, "agreed": 3}}
    card = ModelCard.from_dict({"offline_metrics": {"n": 40, "positives": 20, "policy_value": value}})
    markdown = card_markdown(ModelVersion("v9", "logreg", {}, [], T0, card), "champion")
    assert "## Policy value" in markdown
    assert "7 of the log's decisions (any version's) were left out of every estimate" in markdown
    assert ("| champion | 3 |" in markdown) is with_estimate
    summary = _card_summary("v9", {"card": card.to_dict()})
    assert "policy value: 7 decisions of the log left out, logged without a usable propensity" in summary


def test_the_summary_counts_of_a_large_log_carry_a_thousands_mark() -> None:
    """The CLI's summary counted with its own copy of `counted`, without the thousands' mark the log lines have:
    'over 12345 rewards' beside a log line's '12,345'; the card's policy value table wrote 'agreed 1234' after that."""
    from app.models_cli import _card_summary

    card = ModelCard.from_dict({"offline_metrics": {"n": 12_345, "positives": 6_000, "policy_value": {
        "skipped_without_propensity": 2_000,
        "as_champion": {"decisions": 1_234, "logged_reward": 0.5, "greedy": {"snips": 0.5, "agreed": 1_234}}}}})
    summary = _card_summary("v9", {"card": card.to_dict()})
    assert "v9: progressive validation over 12,345 rewards (" in summary, summary
    assert "as champion, over 1,234 rewarded decisions (" in summary, summary
    assert "policy value: 2,000 decisions of the log left out" in summary, summary
    markdown = card_markdown(ModelVersion("v9", "logreg", {}, [], T0, card), "champion")
    assert "| champion | 1,234 | 0.5 | 0.5 | n/a | 1,234 |" in markdown, markdown
    assert "2,000 of the log's decisions (any version's) were left out" in markdown, markdown


def test_a_card_evaluated_before_the_version_shadowed_any_rewarded_decision_says_why_it_has_no_policy_value() -> None:
    """The README's sequence, `shadow v2` then `evaluate v2` at once: the card (and the CLI's summary) had no policy
    value and no word of why, read as a version ready to promote on its offline metrics alone."""
    from app.models_cli import _card_summary

    card = ModelCard.from_dict({"offline_metrics": {"n": 40, "positives": 20, "policy_value": {
        "source": "inverse propensity scoring over the rewarded decision log (tip_scores)"}}})
    markdown = " ".join(card_markdown(ModelVersion("v9", "fm", {}, [], T0, card), "shadow").split())
    said = ("None yet: no rewarded decision of the log was served or shadowed by v9. Once decisions it shadows or "
            "serves have reactions, `tipstream models evaluate v9` estimates it.")
    assert f"## Policy value (off-policy, from the logged propensities) {said}" in markdown
    assert "policy value: none yet: no rewarded decision of the log was served or shadowed by v9" in \
        _card_summary("v9", {"card": card.to_dict()})
    # A card of a release before policy values (none at all) says nothing of them, as before.
    older = ModelCard.from_dict({"offline_metrics": {"n": 40, "positives": 20}})
    assert "Policy value" not in card_markdown(ModelVersion("v9", "fm", {}, [], T0, older))


def test_the_card_says_what_its_policy_value_s_decisions_count_beside_the_metrics_n() -> None:
    """The metrics' `n` counts rewarded tips of every version's decisions, the policy value's `decisions` this
    version's decisions: the card explained the one and left the other a bare column heading."""
    card = ModelCard.from_dict({"offline_metrics": {"n": 12, "positives": 6, "policy_value": {
        "as_champion": {"decisions": 3, "logged_reward": 0.5, "greedy": {"snips": 0.5}}}}})
    markdown = " ".join(card_markdown(ModelVersion("v9", "logreg", {}, [], T0, card)).split())
    assert ("Over the decisions the offline metrics' rewards come from: `decisions` counts those of them this version "
            "served (as champion) or shadowed, one each however many of its tips got a reaction, where the metrics' "
            "`n` counts rewarded tips of every version's decisions.") in markdown


OLDER_METRICS = {"n": 400, "log_loss": 0.61, "roc_auc": 0.7, "mean_reward": 0.4, "mean_score": 0.41,
                 "calibration_error": 0.01, "evaluated_at": "2026-11-27T10:00:00+00:00",
                 "source": "progressive validation over the rewarded decision log (tip_scores)"}


@pytest.mark.parametrize(("kind", "metrics", "says"), [
    # A release before 2026-12-05: no base rate, no positives, no skipped_unsupported in its policy value.
    ("logreg", OLDER_METRICS, "Computed by a release before 2026-12-05 (commit 34bdf2e), not as described above"),
    ("fm", OLDER_METRICS, "Computed by a release before 2026-12-05 (commit 34bdf2e), not as described above"),
    # One since, that did not record how its model learned a reward of 0.8.
    ("logreg", {**OLDER_METRICS, "positives": 180, "log_loss_base_rate": 0.66},
     "until 2026-12-07 (commit 2284055) a logistic regression learned one as two weighted binary steps"),
    ("fm", {**OLDER_METRICS, "positives": 180, "log_loss_base_rate": 0.66}, None),  # two steps, before and since
])
def test_a_card_computed_by_an_older_release_says_so_where_it_was_explained_as_computed_now(
        kind: str, metrics: dict, says: str | None) -> None:
    """Read back, a card's metrics were explained as computed now (delayed progressive validation, a soft reward
    learned in one step, ROC AUC exact, calibration over ten bins, a base rate to read the log loss against),
    whatever release computed them: one from before soft labels, or from before the base rate, misled."""
    value = {"as_champion": {"decisions": 100, "logged_reward": 0.4, "greedy": {
        "snips": 0.5, "ips": 0.5, "n": 100, "agreed": 30, "effective_n": 20.0, "ci95": [0.3, 0.7]}}}
    stored = {"version": "v1", "kind": kind, "params": {"learning_rate": 0.05}, "feature_names": ["hour_of_day"],
              "created_at": "2026-11-27T10:00:00+00:00",
              "card": {"inputs": {"hour_of_day": "numeric"}, "offline_metrics": {**metrics, "policy_value": value},
                       "fairness": {"tenure": {"segments": {"new": {"n": 200, "roc_auc": 0.7}}, "compared": ["new"],
                                               "max_gap": {"roc_auc": 0.0}, "worst": {"roc_auc": "new"}}}}}
    markdown = " ".join(card_markdown(ModelVersion.from_dict(json.loads(json.dumps(stored))), "champion").split())
    if says is None:
        assert "Computed by a release" not in markdown
    else:
        assert says in markdown and "`tipstream models evaluate v1` recomputes the card as described." in markdown
    # Counted before decisions that could not have served its choice were left out: unknown, not 0.
    assert "| champion | 100 | 0.4 | 0.5 | [0.3, 0.7] | 30 | 20 | n/a | - |" in markdown


def test_a_card_computed_now_says_how_its_model_learned_soft_rewards() -> None:
    from app import evaluation

    examples = [({"tip_id": "a"}, 0.8), ({"tip_id": "b"}, 0.3)] * 20
    for kind, learned in (("logreg", "in one step, as a soft label"), ("fm", "as two weighted binary steps")):
        _, card = evaluation.evaluate({"kind": kind}, examples)
        markdown = card_markdown(ModelVersion("v2", kind, {}, [], T0, card))
        assert f"| soft_rewards_learned | {learned} |" in markdown and "Computed by a release" not in markdown
