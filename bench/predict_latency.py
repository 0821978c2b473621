"""Measure ``POST /predict`` latency (single item) against a running server: p50/p95 over sequential requests.

python bench/predict_latency.py --url http://localhost:5000 --requests 200 [--model JOB_ID] [--token T]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import requests

QUESTION = "is the sky blue during the day"
PASSAGE = (
    "Diffuse sky radiation -- The sky appears blue during the day because air molecules scatter "
    "short (blue) wavelengths of sunlight much more than long (red) ones."
)


def percentile(sorted_values: list[float], share: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, round(share * (len(sorted_values) - 1)))]


def measure(url: str, n: int, model: str | None, token: str | None) -> dict:
    body = {"question": QUESTION, "passage": PASSAGE} | ({"model": model} if model else {})
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    with requests.Session() as session:
        session.post(f"{url}/predict", json=body, headers=headers, timeout=120).raise_for_status()  # loads the model
        latencies = []
        for _ in range(n):
            started = time.perf_counter()
            session.post(f"{url}/predict", json=body, headers=headers, timeout=30).raise_for_status()
            latencies.append((time.perf_counter() - started) * 1000)
    latencies.sort()
    return {
        "requests": n,
        "p50_ms": round(percentile(latencies, 0.50), 1),
        "p95_ms": round(percentile(latencies, 0.95), 1),
        "mean_ms": round(statistics.fmean(latencies), 1),
        "max_ms": round(latencies[-1], 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://localhost:5000")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--model", help="job id (default: the latest succeeded job)")
    parser.add_argument("--token", help="API_TOKEN, if the server requires one")
    args = parser.parse_args()
    print(json.dumps(measure(args.url.rstrip("/"), args.requests, args.model, args.token)))


if __name__ == "__main__":
    main()
