"""Bounded load test against a running bitdance server.

    python bench/load_test.py --url http://127.0.0.1:8000 --requests 200 --concurrency 16

Sends ``--requests`` POST /generate calls, at most ``--concurrency`` at a time, with prompts from
the GenEval prompt list (``/work/shared/data/geneval_prompts.jsonl``: one JSON object per line with
a ``prompt`` key; synthetic prompts if the file is missing), and reports p50/p95/max latency,
images/s and requests/s, and what every request ended as: an image, a clear error (an HTTP error
with a JSON ``error.code``), or lost (transport error, timeout, malformed answer). Exits 1 if
anything was lost. ``--stream`` uses SSE and also reports time to first preview.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import statistics
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

DEFAULT_PROMPTS = [
    Path("/work/shared/data/geneval_prompts.jsonl"),
    Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "geneval_prompts.jsonl",
]


def load_prompts(path: str | None, n: int) -> tuple[list[str], str]:
    candidates = [Path(path)] if path else DEFAULT_PROMPTS
    for p in candidates:
        if p.is_file():
            prompts = []
            for line in p.read_text().splitlines():
                line = line.strip()
                if line:
                    prompts.append(str(json.loads(line)["prompt"]))
            if prompts:
                return [prompts[i % len(prompts)] for i in range(n)], str(p)
    colours, things = ["red", "green", "blue", "yellow"], ["cube", "ball", "dog", "car", "tree"]
    return [f"a photo of a {colours[i % 4]} {things[i % 5]}" for i in range(n)], "synthetic"


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


async def one(client: httpx.AsyncClient, body: dict[str, Any], stream: bool) -> dict[str, Any]:
    t0 = time.perf_counter()
    out: dict[str, Any] = {"images": 0, "first_preview_s": None}
    try:
        if stream:
            async with client.stream("POST", "/generate", json={**body, "stream": True}) as r:
                if r.status_code != 200:
                    await r.aread()
                    return {**out, **_error(r), "latency_s": time.perf_counter() - t0}
                event = None
                async for line in r.aiter_lines():
                    if line.startswith("event: "):
                        event = line[7:]
                    elif line.startswith("data: "):
                        data = json.loads(line[6:])
                        if event == "preview" and out["first_preview_s"] is None:
                            out["first_preview_s"] = time.perf_counter() - t0
                        elif event == "completed":
                            out.update(outcome="image", images=_count_images(data))
                        elif event == "error":
                            out.update(outcome="error", code=data.get("code", "?"))
                if "outcome" not in out:
                    out.update(outcome="lost", code="stream ended without completed/error")
        else:
            r = await client.post("/generate", json=body)
            if r.status_code == 200:
                out.update(outcome="image", images=_count_images(r.json()))
            else:
                out.update(_error(r))
    except (httpx.HTTPError, ValueError, KeyError) as exc:
        out.update(outcome="lost", code=type(exc).__name__)
    out["latency_s"] = time.perf_counter() - t0
    return out


def _count_images(body: dict[str, Any]) -> int:
    return sum(1 for im in body["images"] if base64.b64decode(im["b64_json"], validate=True))


def _error(r: httpx.Response) -> dict[str, Any]:
    try:
        code = r.json()["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return {"outcome": "lost", "code": f"HTTP {r.status_code} without an error body"}
    return {"outcome": "error", "code": f"{r.status_code} {code}"}


async def run(args: argparse.Namespace) -> dict[str, Any]:
    prompts, source = load_prompts(args.prompts, args.requests)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=args.concurrency, max_keepalive_connections=args.concurrency)
    sem = asyncio.Semaphore(args.concurrency)
    params: dict[str, Any] = {k: v for k, v in (("width", args.width), ("height", args.height), ("steps", args.steps),
                                                 ("guidance_scale", args.guidance_scale)) if v is not None}  # fmt: skip
    async with httpx.AsyncClient(base_url=args.url, headers=headers, timeout=args.timeout, limits=limits) as client:
        (await client.get("/readyz")).raise_for_status()

        async def task(i: int) -> dict[str, Any]:
            async with sem:
                return await one(client, {"prompt": prompts[i], "seed": i, **params}, args.stream)

        t0 = time.perf_counter()
        results = await asyncio.gather(*(task(i) for i in range(args.requests)))
        wall = time.perf_counter() - t0
    ok = [r for r in results if r["outcome"] == "image"]
    latencies = [r["latency_s"] for r in ok]
    previews = [r["first_preview_s"] for r in ok if r["first_preview_s"] is not None]
    outcomes = Counter(r["outcome"] for r in results)
    return {
        "url": args.url,
        "prompts": source,
        "requests": args.requests,
        "concurrency": args.concurrency,
        "params": params,
        "wall_s": round(wall, 3),
        "completed": outcomes["image"],
        "errors": outcomes["error"],
        "lost": outcomes["lost"],
        "error_codes": dict(Counter(r["code"] for r in results if r["outcome"] != "image")),
        "images": sum(r["images"] for r in ok),
        "images_per_s": round(sum(r["images"] for r in ok) / wall, 3),
        "requests_per_s": round(len(ok) / wall, 3),
        "latency_p50_s": round(percentile(latencies, 50), 3),
        "latency_p95_s": round(percentile(latencies, 95), 3),
        "latency_max_s": round(max(latencies), 3) if latencies else None,
        "latency_mean_s": round(statistics.fmean(latencies), 3) if latencies else None,
        "first_preview_p50_s": round(percentile(previews, 50), 3) if previews else None,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--prompts", help="JSONL with a 'prompt' key per line (default: GenEval prompts)")
    p.add_argument("--width", type=int)
    p.add_argument("--height", type=int)
    p.add_argument("--steps", type=int)
    p.add_argument("--guidance-scale", type=float)
    p.add_argument("--stream", action="store_true", help="use SSE (also measures time to first preview)")
    p.add_argument("--api-key")
    p.add_argument("--timeout", type=float, default=600.0)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = p.parse_args(argv)
    report = asyncio.run(run(args))
    if args.json:
        print(json.dumps(report))
    else:
        for key, value in report.items():
            print(f"{key:>22}: {value}")
    return 1 if report["lost"] else 0


if __name__ == "__main__":
    sys.exit(main())
