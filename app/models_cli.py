"""`tipstream models ...`: the model registry from the command line.

Reads (`list`, `card`) come from the database, so they work whether or not the service runs.
Changes (`register`, `shadow`, `promote`, `rollback`, `retire`, `evaluate`) go to the running
service's admin endpoint with `TIPSTREAM_ADMIN_TOKEN`: the service owns the live models and
applies a change to them and to the database together.
"""

from __future__ import annotations

import argparse
import getpass
import http.client
import ipaddress
import json
import socket
import sys
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from models.registry import escaped, thompson_caveat
from streams.log_throttle import counted

ANSWER_TIMEOUT_S = 120.0  # register trains the new version on the log before it answers


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """The service never redirects a change. urllib followed a 301/302/303 as a GET, with the
    admin token, to wherever it pointed (another host too), and printed that answer as if the
    change had been made."""

    def redirect_request(self, req: Any, fp: Any, code: int, msg: str, headers: Any, newurl: str) -> None:
        return None  # urllib then raises the 3xx as an HTTPError


_OPENER = urllib.request.build_opener(_NoRedirect)
# No proxy for a service on this machine: urllib sent every request through `http_proxy` when the environment
# set one (a corporate host's, a CI runner's), the admin token in plain text to the proxy, though the service
# was on 127.0.0.1. A proxy named for another host is the operator's to choose.
_DIRECT = urllib.request.build_opener(_NoRedirect, urllib.request.ProxyHandler({}))


def _opener_for(url: str) -> urllib.request.OpenerDirector:
    """
    >>> _opener_for("http://127.0.0.1:8000") is _DIRECT, _opener_for("http://[::1]:8000") is _DIRECT
    (True, True)
    >>> _opener_for("http://LocalHost:8000") is _DIRECT, _opener_for("https://tipstream.internal") is _OPENER
    (True, True)
    """
    host = (urllib.parse.urlsplit(url).hostname or "").rstrip(".")
    if host == "localhost" or host.endswith(".localhost"):
        return _DIRECT
    try:
        return _DIRECT if ipaddress.ip_address(host).is_loopback else _OPENER
    except ValueError:  # a name, not an address
        return _OPENER
CHANGES = ("register", "shadow", "promote", "rollback", "retire", "evaluate")


def _settings() -> Any:
    from app.settings import load_settings

    return load_settings()  # read now: the environment is the operator's, not a cached copy


def _default_actor() -> str:
    try:
        return f"{getpass.getuser()}@{socket.gethostname()}"
    except Exception:  # noqa: BLE001 - no user name in some containers
        return "cli"


def no_database(settings: Any) -> str:
    """Why a read found no tipstream tables where `settings` name the database, and what to do."""
    from app.start_errors import shown_database_url
    from app.startup import LOCK_FILE

    url = settings.sqlalchemy_url
    if settings.database_url:  # the data directory plays no part: not to be named
        return (f"No tipstream tables at {shown_database_url(url)} (DATABASE_URL): no service has started on that "
                "database yet (the first `tipstream run`, or `tipstream migrate`, makes them), or the service's "
                "DATABASE_URL is another; set it as the service has it.")
    if (settings.data_dir / "tipstream.db").exists():  # the service's data directory, after `migrate base`
        return (f"No tipstream tables in {shown_database_url(url)} (TIPSTREAM_DATA_DIR): `tipstream migrate base` "
                "dropped them, or no start has got that far; start the service (`tipstream run`) to make them "
                "again and rebuild from the log.")
    if (settings.data_dir / LOCK_FILE).exists():
        # A service started here, and its database is not here: it has DATABASE_URL. "Run this where the
        # service runs" sent the operator, who was there, looking for another directory.
        return (f"No tipstream database in {settings.data_dir} (TIPSTREAM_DATA_DIR), though a service has run from "
                "it: that service keeps its database at its DATABASE_URL (PostgreSQL, say). Set DATABASE_URL as it "
                "has it.")
    # Before any start, "run this where the service runs" left a new user looking for a service they had not run.
    return (f"No tipstream database at {shown_database_url(url)}: no service has run here yet (the first "
            "`tipstream run`, or `tipstream migrate`, creates it), or run this where the service runs (its "
            "TIPSTREAM_DATA_DIR), or set DATABASE_URL / TIPSTREAM_DATA_DIR as the service has them.")


def _registry() -> Any:
    from sqlalchemy.exc import DBAPIError

    from app import migrate
    from app.db import make_engine
    from app.registry_store import RegistryStore, UnreadableRegistry
    from app.start_errors import shown_database_url

    settings = _settings()
    url = settings.sqlalchemy_url
    # A read must not create a database: from the wrong directory it would make an empty one
    # and report "no versions" while the service runs elsewhere.
    revision = migrate.current(url)
    if revision is None:
        raise SystemExit(no_database(settings))
    if revision not in migrate.revisions():  # read-only: "Cannot migrate", as a start says, would mislead
        where = "DATABASE_URL" if settings.database_url else "TIPSTREAM_DATA_DIR"
        raise SystemExit(f"The database at {shown_database_url(url)} ({where}) is at revision {revision!r}, which this "
                         "release does not know: a newer tipstream wrote it. Read it with that release's "
                         "`tipstream models`.")
    # Read as it is, not migrated first: the database of an older release still serving it (a new
    # release's CLI tried before the upgrade) was migrated to a revision that release does not know,
    # and its next start failed on it.
    engine = make_engine(url)
    try:
        return RegistryStore(engine).load()
    except UnreadableRegistry as error:  # a JSONDecodeError (or KeyError, ...) traceback named neither
        raise SystemExit(f"{error}.") from None
    except DBAPIError:
        if revision == migrate.revisions()[-1]:
            raise
        raise SystemExit(f"The database at {shown_database_url(url)} is at revision {revision}, of an older release "
                         "whose registry this one cannot read: upgrade it (`tipstream migrate`, or start this release "
                         "on it), after stopping any older service that runs on it.") from None
    finally:
        engine.dispose()


def _reads_the_database(url: str) -> str:
    raise argparse.ArgumentTypeError(
        "`list` and `card` read the database, not the service: set DATABASE_URL (or TIPSTREAM_DATA_DIR) as the "
        "service has it; the running service's GET /models and GET /models/{version} answer over HTTP")


def _list(args: argparse.Namespace) -> int:
    registry, models = _registry()
    if not registry.versions:
        print("No model versions yet: the service registers v1 on its first start (`tipstream run`).")
        return 0
    print(f"{'version':<16} {'kind':<8} {'role':<10} {'rewards learned':>16}  created")
    for version, mv in registry.versions.items():
        role = registry.role(version) or "-"
        print(f"{version:<16} {mv.kind:<8} {role:<10} {models[version][1]:>16}  {mv.created_at.isoformat()}")
    print("(rewards learned as of the models' last save to the database; the running service's GET /models "
          "has them live)")
    return 0


def _card(args: argparse.Namespace) -> int:
    from models.registry import RegistryError

    registry, _ = _registry()
    try:
        if args.json:
            print(json.dumps(registry.get(args.version).shown() | {"role": registry.role(args.version)}, indent=2))
        else:
            print(registry.card_markdown(args.version), end="")
    except RegistryError as error:
        print(error, file=sys.stderr)
        return 1
    return 0


def _param(text: str) -> tuple[str, Any]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"--param needs NAME=VALUE, got {text!r}")
    try:
        return name, json.loads(value)
    except json.JSONDecodeError:
        return name, value


def admin_call(url: str | None, path: str, body: dict[str, Any] | None, doing: str, see: str,
               method: str = "POST") -> Any:
    """The running service's answer to an admin request (`TIPSTREAM_ADMIN_TOKEN`), or the exit code after
    saying on stderr why there is none. `doing` and `see` complete the messages: what the call is for,
    and where to look whether it landed after all."""
    from app.startup import http_url

    settings = _settings()
    # Stripped, as the server strips it: a token read from a file ends with a newline, which no header
    # can carry; http.client's ValueError was a traceback that showed the token.
    token = settings.admin_token.get_secret_value().strip() if settings.admin_token is not None else ""
    if not token:
        print(f"Set TIPSTREAM_ADMIN_TOKEN to the server's admin token to {doing}.", file=sys.stderr)
        return 2
    if not all(" " <= c <= "~" for c in token):
        print("TIPSTREAM_ADMIN_TOKEN holds a character an HTTP header cannot carry (a control character, or "
              "one outside ASCII): use printable ASCII, on the server too.", file=sys.stderr)
        return 2
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::", "") else settings.host
    if url is None and settings.port == 0:  # http://host:0 was "connection refused"
        print("TIPSTREAM_PORT is 0, so the service picked its port: pass --url as `tipstream run` printed it "
              "(tipstream on http://...).", file=sys.stderr)
        return 2
    base = url or http_url(host, settings.port)
    # A scheme is case-insensitive, as urllib reads it: "HTTP://h:8000" was refused as having none.
    if not base.lower().startswith(("http://", "https://")):  # urllib said only "unknown url type"
        scheme, sep, rest = base.partition("://")
        if sep and scheme and rest:  # "ftp://x" has a scheme: "e.g. http://ftp://x" was no fix
            print(f"--url {base!r} is {scheme}://, which the service does not answer: give its http:// or https:// "
                  f"address, e.g. http://{rest}.", file=sys.stderr)
        else:
            print(f"--url {base!r} needs its scheme, e.g. http://{base}.", file=sys.stderr)
        return 2
    if not _url_is_usable(base):  # http.client's InvalidURL was a traceback
        print(f"--url {base!r} is not the service's address: write it as http://HOST:PORT, e.g. "
              "http://127.0.0.1:8000.", file=sys.stderr)
        return 2
    base = base.rstrip("/")
    request = urllib.request.Request(
        base + path, data=None if body is None else json.dumps(body).encode(), method=method,
        headers={"Content-Type": "application/json",
                 "Authorization": f"Bearer {token}"})
    try:
        with _opener_for(base).open(request, timeout=ANSWER_TIMEOUT_S) as response:
            answer = json.loads(response.read())
    except urllib.error.HTTPError as error:
        if 300 <= error.code < 400:
            print(f"{base} answered {error.code}, a redirect to {error.headers.get('Location')!r}; not followed (it "
                  "would carry TIPSTREAM_ADMIN_TOKEN), and nothing changed: pass --url as the service's own "
                  "address.", file=sys.stderr)
            return 1
        message = _their_error(error.read())
        if message is None:  # another web server's page: "refused (404): File not found" read as tipstream's word
            print(f"{base} answered {error.code} ({error.reason}), but not as tipstream does (no JSON error): is "
                  "--url the service's address?", file=sys.stderr)
            return 1
        prefix = urllib.parse.urlsplit(base).path
        # `--url http://h:8000/admin` sent POST /admin/admin/rollback. Not a 404 of a path the service has
        # ("no request to forget user ..."), which a proxy serving it under a path gives too.
        if error.code == 404 and prefix and ": Not Found" in message:
            message += (f"; --url ends in a path ({prefix}), which goes before {path}: give the service's own "
                        "address, http://HOST:PORT, unless a proxy serves it under that path")
        # Escaped: the refusal may quote what was sent (a user id, shell-quoted, kept its ESC codes raw).
        print(f"refused ({error.code}): {escaped(message)}", file=sys.stderr)
        return 1
    except urllib.error.URLError as error:
        if isinstance(error.reason, ConnectionResetError):  # reset while the request was sent: not "start it"
            return _no_http_answer(base, error.reason, see)
        # The address came from the settings when no --url was given: a service started with its own
        # TIPSTREAM_PORT runs, and "start it" was no fix for the shell that lacks that setting.
        fix = ("set them as the service has them, or pass --url" if url is None
               else "pass --url as `tipstream run` printed it (tipstream on http://...)")
        where = ", the address of TIPSTREAM_HOST and TIPSTREAM_PORT" if url is None else ""
        print(f"No tipstream answering at {base} ({error.reason}){where}: start it with `tipstream run`, or {fix}.",
              file=sys.stderr)
        return 1
    except (http.client.HTTPException, ConnectionError) as error:  # once sent; urllib wraps only the sending
        return _no_http_answer(base, error, see)
    except TimeoutError:  # the read, after the connection: the server took the change and is still at it
        print(f"{base} took more than {ANSWER_TIMEOUT_S:.0f} s to answer; the change may still land: see "
              f"{see} before trying again.", file=sys.stderr)
        return 1
    except json.JSONDecodeError:
        print(f"{base} answered, but not as tipstream does (no JSON): is --url the service's address?",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # a traceback before; the server, sent the change, goes on with it
        print(f"Interrupted before {base} answered; the change may still land: see {see} "
              "before trying again.", file=sys.stderr)
        return 130
    return answer


def _no_http_answer(base: str, error: Exception, see: str) -> int:
    # Another kind of server on that port (Redis closes, RabbitMQ resets, NATS sends INFO): tracebacks.
    # The service's own address ends no connection unanswered, but one that stops meanwhile might.
    print(f"{base} gave no HTTP answer ({error!r:.120}): is --url the service's address (`tipstream run` prints "
          f"it: tipstream on http://...)? If it is, the change may still land: see {see} before trying again.",
          file=sys.stderr)
    return 1


def _change(args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"actor": args.actor, "note": args.note}
    if args.action == "rollback":
        path = "/admin/rollback"
        if args.champion is not None:  # the service refuses once another is champion: no second step back
            body["champion"] = args.champion
    elif args.action == "register":
        path = "/admin/models"
        names = [name for name, _ in args.param or []]
        twice = sorted({name for name in names if names.count(name) > 1})
        if twice:  # the last one was taken without a word: two --param interactions=... kept only the second's pairs
            print(f"--param {', '.join(twice)} given more than once: give each parameter once (interactions takes "
                  'every pair in one list: [["category", "hour_of_day"], ["tip_id", "preferred_hour"]]).',
                  file=sys.stderr)
            return 2
        body |= {"version": args.version, "kind": args.kind, "params": dict(args.param or [])}
    else:
        # Quoted: "v 2" was a traceback (InvalidURL), and "v2/promote?" sent to evaluate promoted v2.
        path = f"/admin/models/{urllib.parse.quote(args.version, safe='')}/{args.action}"
    answer = admin_call(args.url, path, body, "change the registry", "`tipstream models list`")
    if isinstance(answer, int):
        return answer
    if args.action in ("register", "evaluate"):
        print(json.dumps(answer, indent=2) if args.json else _card_summary(args.version, answer))
    else:
        print(f"champion: {answer['champion']}, shadow: {answer['shadow'] or '-'}")
        last = answer["history"][-1]
        note = f": {escaped(last['note'])}" if last["note"] else ""  # what an admin wrote, shown to a terminal
        print(f"{last['at']} {last['action']} {last['version']} by {escaped(last['actor'])}{note}")
    return 0


def _their_error(body: bytes) -> str | None:
    """The message of tipstream's error answer (`{"error": ..., "field": ...}`), or None for any other body.

    >>> _their_error(b'{"error": "no such version", "field": "version"}'), _their_error(b"<html>Not Found</html>")
    ('no such version', None)
    """
    try:
        answer = json.loads(body)
    except ValueError:
        return None
    return answer["error"] if isinstance(answer, dict) and isinstance(answer.get("error"), str) else None


def _url_is_usable(url: str) -> bool:
    """Whether urllib can send to `url`: a host without spaces or control characters, a port that is one.

    >>> [_url_is_usable(url) for url in ("http://127.0.0.1:8000", "https://[::1]", "http:", "http://x y",
    ...                                  "http://h:port", "http://h:99999")]
    [True, True, False, False, False, False]
    """
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number or out of range
    except ValueError:
        return False
    return bool(parts.hostname) and all(c.isprintable() and not c.isspace() for c in parts.netloc)


def _interval(bounds: list[float] | None) -> str:
    return f" [{', '.join(_short(v) for v in bounds)}]" if bounds else ""


def _whole(n: Any) -> str:
    """A count with its thousands marked, as `counted` writes them; anything else (None: not in the card) as it is.

    >>> _whole(1234), _whole(None)
    ('1,234', 'None')
    """
    return f"{n:,}" if isinstance(n, int) else str(n)


def _card_summary(version: str, answer: dict[str, Any]) -> str:
    """What a registration or an evaluation found, in a few lines (`--json`: everything).

    >>> estimate = {"snips": 0.5, "ci95": [0.3, 0.7], "agreed": 1234, "effective_n": 7.5, "skipped_unsupported": 2000}
    >>> print(_card_summary("v2", {"kind": "fm", "card": {"offline_metrics": {"n": 9000, "log_loss": 0.61234,
    ...     "log_loss_base_rate": 0.66, "roc_auc": 0.7, "policy_value": {"as_shadow": {"decisions": 8000, "logged_reward": 0.4,
    ...     "estimate": estimate, "champion_greedy": {**estimate, "snips": 0.45}}}}}}))
    v2 (fm): progressive validation over 9,000 rewards (rewarded tips of the logged decisions): log loss 0.6123 (predicting the mean: 0.66), ROC AUC 0.7
    as shadow, over 8,000 rewarded decisions (logged reward 0.4): its own first choices 0.5 [0.3, 0.7] (agreed 1,234, effective n 7.5, 2,000 left out: not every tip could have been served there, as under explore: false or TIPSTREAM_POLICY=greedy); the champion's 0.45 [0.3, 0.7] (agreed 1,234)
    the whole card: tipstream models card v2
    >>> print(_card_summary("v1", {"offline_metrics": {"n": 1, "policy_value": {"as_champion": {"decisions": 1,
    ...     "logged_reward": 1.0, "greedy": {"snips": 1.0, "ci95": None, "agreed": 1, "effective_n": 1.0}}}}}))
    v1: progressive validation over 1 reward (rewarded tips of the logged decisions): log loss n/a, ROC AUC n/a
    too few to read: 1 reward (the fairness check compares at least 30)
    as champion, over 1 rewarded decision (logged reward 1): its own first choices 1 (agreed 1, effective n 1, no interval: effective n under 30 or rewards all alike)
    the whole card: tipstream models card v1

    A shadow is compared where every tip could have been served: under `explore: false` or the
    greedy policy, nowhere, whether or not it agreed with the tip served.

    >>> none = {"snips": None, "ci95": None, "agreed": 0, "effective_n": 0.0, "skipped_unsupported": 800}
    >>> print(_card_summary("v2", {"offline_metrics": {"n": 800, "log_loss": 0.5, "roc_auc": 0.7, "policy_value": {
    ...     "as_shadow": {"decisions": 800, "logged_reward": 0.71, "estimate": none, "champion_greedy": none}}}}))
    v2: progressive validation over 800 rewards (rewarded tips of the logged decisions): log loss 0.5, ROC AUC 0.7
    as shadow, over 800 rewarded decisions (logged reward 0.71): its own first choices n/a (agreed 0, effective n 0, 800 left out: not every tip could have been served there, as under explore: false or TIPSTREAM_POLICY=greedy); the champion's n/a (agreed 0)
    the whole card: tipstream models card v2

    An interaction asked for that no learned example could form is said (`--param interactions` misspelt):

    >>> print(_card_summary("v4", {"card": {"offline_metrics": {"n": 40, "positives": 20, "log_loss": 0.6,
    ...     "roc_auc": 0.6}, "inputs": {"tip_id": "categorical, one-hot",
    ...     "tip_id*hour": "interaction, never formed: no input 'hour' in what it learned"}}}))
    v4: progressive validation over 40 rewards (rewarded tips of the logged decisions): log loss 0.6, ROC AUC 0.6
    interactions never formed over the log: tip_id*hour (no input 'hour' in what it learned): a misspelt input, or one your app does not send (yet)
    the whole card: tipstream models card v4
    """
    from models.offpolicy import MIN_EFFECTIVE_N
    from models.registry import CLI, DAMAGED_ROWS_LEFT_OUT, no_policy_value_yet
    from models.reward import NEVER_FORMED
    from models.validation import too_few

    card = answer.get("card", answer)
    metrics = card.get("offline_metrics") or {}
    kind = f" ({answer['kind']})" if "kind" in answer else ""
    if metrics.get("n"):
        # `n` counts examples, one per rewarded tip: a decision with two reactions is two.
        # A log loss reads only against its base rate (soft rewards keep every model's above 0): an FM with
        # latents=all read "log loss 15.44" beside a base rate of 0.64 that only the card showed.
        base = metrics.get("log_loss_base_rate")
        against = f" (predicting the mean: {_short(base)})" if base is not None else ""
        rewards = counted(metrics["n"], "reward", "rewards")
        lines = [(f"{version}{kind}: progressive validation over {rewards} (rewarded tips of the logged decisions): "
                  f"log loss "
                 f"{_short(metrics.get('log_loss'))}{against}, ROC AUC {_short(metrics.get('roc_auc'))}")]
        few = too_few(metrics)
        if few:
            lines.append(f"too few to read: {few}")
    else:
        lines = [f"{version}{kind}: no rewarded decisions in the log yet, so no offline metrics"]
    if metrics.get("skipped_damaged_rows"):
        lines.append(DAMAGED_ROWS_LEFT_OUT.format(metrics["skipped_damaged_rows"]))
    value = metrics.get("policy_value") or {}
    for role, own, other in (("champion", "greedy", None), ("shadow", "estimate", "champion_greedy")):
        found = value.get(f"as_{role}")
        if not found:
            continue
        mine = found.get(own) or {}
        interval = mine.get("ci95")
        decisions = counted(found["decisions"], "rewarded decision", "rewarded decisions")
        line = (f"as {role}, over {decisions} (logged reward {_short(found.get('logged_reward'))}): "
                f"its own first choices {_short(mine.get('snips'))}"
                f"{_interval(interval)} "
                f"(agreed {_whole(mine.get('agreed'))}, effective n {_short(mine.get('effective_n'))}")
        if not interval and mine.get("snips") is not None:  # offpolicy gives none on too little: say why
            line += f", no interval: effective n under {MIN_EFFECTIVE_N} or rewards all alike"
        if mine.get("skipped_unsupported"):
            # As shadow, on the decisions where any tip could have been served (`evaluation.policy_value`).
            why = ("not every tip could have been served there, as under explore: false or TIPSTREAM_POLICY=greedy"
                   if role == "shadow" else "they could not have served its choice")
            line += f", {_whole(mine['skipped_unsupported'])} left out: {why}"
        line += ")"
        if other and found.get(other):
            theirs = found[other]  # with its interval and agreed decisions, as the shadow's own
            line += (f"; the champion's {_short(theirs.get('snips'))}{_interval(theirs.get('ci95'))} "
                     f"(agreed {_whole(theirs.get('agreed'))})")
        lines.append(line)
    if value and not ({"as_champion", "as_shadow"} & value.keys()):
        lines.append(f"policy value: none yet: {no_policy_value_yet(version)}")
    if value.get("skipped_without_propensity"):  # left out of both estimates above, or the reason there are none
        left_out = counted(value["skipped_without_propensity"], "decision", "decisions")
        lines.append(f"policy value: {left_out} of the log left out, "
                     "logged without a usable propensity (none, 0 or above 1): no estimate can weigh them")
    caveat = thompson_caveat(value)
    if caveat:
        lines.append(caveat)
    never = {name: use for name, use in (card.get("inputs") or {}).items() if use.startswith(NEVER_FORMED)}
    if never:  # a typo in --param interactions reads as a model like any other, but for this line
        lines.append("interactions never formed over the log: " + "; ".join(
            f"{name} ({use.removeprefix(NEVER_FORMED + ': ')})" for name, use in never.items())
            + ": a misspelt input, or one your app does not send (yet)")
    lines.append(f"the whole card: {CLI} card {version}")
    return "\n".join(lines)


def _short(value: Any) -> str:
    if value is None:  # as the card writes it: "None" read as Python's, not as "no estimate"
        return "n/a"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def add_models_commands(commands: Any) -> None:
    models = commands.add_parser("models", help=f"the model registry: list, card, {', '.join(CHANGES)}")
    sub = models.add_subparsers(dest="models_command", required=True)
    where = "from the database: DATABASE_URL, else <TIPSTREAM_DATA_DIR>/tipstream.db, as the service has them"
    listing = sub.add_parser("list", help=f"every version with its role ({where})")
    listing.set_defaults(func=_list)
    card = sub.add_parser("card", help=f"a version's model card ({where})")
    card.add_argument("version")
    card.add_argument("--json", action="store_true", help="JSON instead of Markdown")
    card.set_defaults(func=_card)
    for reader in (listing, card):
        # Taken only to say why not: as the changes take --url, `list --url` was "unrecognized arguments".
        reader.add_argument("--url", type=_reads_the_database, help=argparse.SUPPRESS)
    for action in CHANGES:
        helps = {
            "register": "register a new version, trained over the decision log",
            "shadow": "make a version the shadow: it scores every request, logged, never shown",
            "promote": "make a shadowed version the champion",
            "rollback": "restore the previous champion",
            "retire": "take a version out of service for good",
            "evaluate": "refresh a version's card: progressive validation, fairness and off-policy value over the log",
        }
        parser = sub.add_parser(action, help=helps[action] + " (through the running service)")
        if action != "rollback":
            parser.add_argument("version")
        else:
            # Two operators undoing one bad promotion, or one rollback run again, rolled back past the champion
            # before it too: each undoes whatever is champion when it lands.
            parser.add_argument("--from", dest="champion", metavar="VERSION",
                                help="the champion to roll back from: refused, and nothing changed, if another is "
                                     "champion by then (someone rolled back or promoted meanwhile)")
        if action in ("register", "evaluate"):
            parser.add_argument("--json", action="store_true", help="print the whole answer (JSON)")
        if action == "register":
            parser.add_argument("--kind", default="logreg", choices=("logreg", "fm"),
                                help="logistic regression or factorisation machine (default: logreg)")
            parser.add_argument("--param", type=_param, action="append", metavar="NAME=VALUE",
                                help="a TipModel parameter, e.g. learning_rate=0.1 (repeatable, each name once)")
        parser.add_argument("--actor", default=_default_actor(), help="who makes the change (default: user@host)")
        parser.add_argument("--note", default="", help="why, for the rollout history")
        parser.add_argument("--url", help="the service (default: http://TIPSTREAM_HOST:TIPSTREAM_PORT)")
        parser.set_defaults(func=_change, action=action)
