"""Under bench/score.py's goals: a bare scorer against a no-op, same server, same load, same run.

    python bench/score_floor.py                 # 5 s per phase, 5 rounds
    python bench/score_floor.py --duration 1    # a quick run

Issue 4 asks `/score` for >= 0.5 of a no-op endpoint's throughput, p99 < 2 ms at 10 candidates
and < 5 ms at 50. This bench measures what a bare scorer gets on the same machine in the same
way: no validation beyond parsing the JSON, no profile features, no exploration, no decision
log, no shadow; only a model over 20 numbers per candidate, by `--model`:
- `scaler_logreg` (default): River's `StandardScaler | LogisticRegression`, `predict_proba_one`
  per candidate (DESIGN.md's measured scorer);
- `one_hot`: the same with one-hot tip and category beside the scaled numbers (closer to the
  service's champion, without its crosses);
- `dot`: a logistic regression's weights summed by hand, no River call: what is left is HTTP,
  JSON and the loop.
The service does everything else issue 4 requires on top of its scoring.

Steps:
1. Train the model on 2,000 examples of a fixed seed, in a server process run as
   `tipstream run` runs its app (uvicorn, uvloop, httptools, no access log), with a Starlette
   no-op (`GET /healthz`, as the service's) and the bare `POST /score`.
2. bench/score.py's load generator, in its own process: 8 keep-alive clients in a closed loop,
   the no-op and `/score` with 10 and with 50 candidates taking turns `--rounds` times.
Last line: {"bench": "score_floor", "model": ..., "p99_ms_10": ..., "p99_ms_50": ..., "rps_10": ..., "noop_rps": ..., "ratio": ...}
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _harness import encode_request, free_port, request_once
from score import TIPS, load_generator, score_requests

NUMERIC = 20  # DESIGN.md's "River scaler + logistic regression, 20 features"


def trained_scorer(kind: str, examples: int = 2_000, seed: int = 7) -> Callable[[dict[str, Any]], float]:
    """P(positive) of one candidate's features, by the model `kind` (see the module's docstring),
    trained on a fixed synthetic sample."""
    import math
    import random

    from river import compose, linear_model, preprocessing

    if kind == "scaler_logreg":
        model = preprocessing.StandardScaler() | linear_model.LogisticRegression()
    elif kind == "dot":
        model = linear_model.LogisticRegression()
    else:
        numbers = [f"{side}{i}" for side in "ut" for i in range(NUMERIC // 2)]
        model = (compose.Select(*numbers) | preprocessing.StandardScaler()) + \
            (compose.Select("tip_id", "category") | preprocessing.OneHotEncoder())
        model |= linear_model.LogisticRegression()
    rng = random.Random(seed)
    for _ in range(examples):
        tip = rng.randrange(len(TIPS))
        x = user_numbers(f"u-{rng.randrange(5_000)}") | tip_numbers(kind, TIPS[tip], tip)
        model.learn_one(x, rng.random() < (0.6 if tip % 12 < 2 else 0.3))
    if kind != "dot":
        return lambda x: model.predict_proba_one(x)[True]
    weights, bias = dict(model.weights), model.intercept
    return lambda x: 1 / (1 + math.exp(-bias - sum(weights[k] * v for k, v in x.items())))


def user_numbers(user_id: str) -> dict[str, float]:
    """Half of the 20 numbers, from the user (as a profile and the context would give them)."""
    user = sum(user_id.encode()) % 997
    return {f"u{i}": (user * (i + 1)) % 17 / 4 for i in range(NUMERIC // 2)}


def tip_numbers(kind: str, tip_id: str, tip: int) -> dict[str, Any]:
    """The other half, from the tip; for `one_hot` its id and category too."""
    x: dict[str, Any] = {f"t{i}": ((tip + 1) * (i + 3)) % 13 / 3 for i in range(NUMERIC // 2)}
    if kind == "one_hot":
        x["tip_id"], x["category"] = tip_id, tip_id.split("-")[1]
    return x


def serve(port: int, kind: str) -> None:
    import orjson
    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    score_of = trained_scorer(kind)
    # What a server would hold per tip, so that a request builds only the user's part.
    per_tip = {tip_id: tip_numbers(kind, tip_id, i) for i, tip_id in enumerate(TIPS)}

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    class Score:
        """A raw ASGI route, as the service's /score is (app/score_endpoint.py): no Request or
        Response (Starlette wraps a plain function in them; an instance it calls as ASGI)."""

        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            body, more = b"", True
            while more:
                message = await receive()
                body += message.get("body", b"")
                more = message.get("more_body", False)
            request = orjson.loads(body)
            user = user_numbers(request["user_id"])
            scored = sorted(((score_of(user | per_tip[c["tip_id"]]), c["tip_id"])
                             for c in request["candidates"]), reverse=True)
            answer = orjson.dumps({"ranked": [{"tip_id": t, "score": s} for s, t in scored]})
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(answer)).encode())]})
            await send({"type": "http.response.body", "body": answer})

    app = Starlette(routes=[Route("/healthz", healthz), Route("/score", Score(), methods=["POST"])])
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", loop="uvloop", http="httptools",
                access_log=False)


async def wait_ready(port: int, process: subprocess.Popen[bytes]) -> None:
    for _ in range(600):
        if process.poll() is not None:
            raise RuntimeError("the floor's server exited")
        try:
            if (await request_once(port, "GET", "/healthz"))[0] == 200:
                return
        except OSError:
            pass
        await asyncio.sleep(0.05)
    raise RuntimeError("the floor's server did not answer in 30 s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per phase (default 5)")
    parser.add_argument("--rounds", type=int, default=5, help="the phases take turns this many times (default 5)")
    parser.add_argument("--requests", type=int, default=200_000, help="at most this many requests per phase")
    parser.add_argument("--model", choices=("scaler_logreg", "one_hot", "dot"), default="scaler_logreg",
                        help="the bare scorer's model (default scaler_logreg, DESIGN.md's measured one)")
    parser.add_argument("--serve", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.model)
        return 0

    port = free_port()
    server = subprocess.Popen([sys.executable, __file__, "--serve", str(port), "--model", args.model])
    try:
        asyncio.run(wait_ready(port, server))
        share, limit = args.duration / args.rounds, max(args.requests // args.rounds, 1)
        score_10, score_50 = score_requests(5_000, 5_000, 10, 2), score_requests(5_000, 5_000, 50, 3)
        phases = [("warm-up", score_10, min(1.0, args.duration), args.requests)]
        for _ in range(args.rounds):
            phases += [("noop", [encode_request("GET", "/healthz")], share, limit), ("score_10", score_10, share, limit),
                       ("score_50", score_50, share, limit)]
        receive, send = multiprocessing.Pipe(duplex=False)
        generator = multiprocessing.get_context("spawn").Process(target=load_generator,
                                                                  args=(port, (server.pid,), phases, send))
        generator.start()
        results = receive.recv()
        generator.join()
    finally:
        server.terminate()
        server.wait(30)
    for name in ("noop", "score_10", "score_50"):
        r = results[name]
        print(f"{name:>9}: {r['rps']:8.0f} req/s  p50 {r['p50_ms']:.3f} ms  p99 {r['p99_ms']:.3f} ms  "
              f"max {r['max_ms']:.1f} ms  server CPU {r['service_cpu_us']:.0f} us/request  "
              f"({r['requests']} requests, {r['errors']} errors)")
    ratio = results["score_10"]["rps"] / results["noop"]["rps"]
    print(f"ratio (score_10 / noop throughput): {ratio:.2f}")
    print(json.dumps({"bench": "score_floor", "model": args.model, "p99_ms_10": round(results["score_10"]["p99_ms"], 3),
                      "p99_ms_50": round(results["score_50"]["p99_ms"], 3), "rps_10": round(results["score_10"]["rps"]),
                      "noop_rps": round(results["noop"]["rps"]), "ratio": round(ratio, 3)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
