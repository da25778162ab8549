"""Each service's memory over a load run, from its Prometheus /metrics (`process_resident_memory_bytes`,
prometheus_client's process collector), so it works as well against a platform on another host.

A thread samples every service every `period` seconds while the load runs; `table()` prints RSS over
time per service, and the growth after warm-up: from the first sample after the first 20% of the run
to the last one, in MB and %. A leak shows as growth that a longer soak does not level off.
"""

from __future__ import annotations

import re
import threading
import time

import httpx

_RSS = re.compile(r"^process_resident_memory_bytes\s+(\S+)$", re.MULTILINE)
WARM_UP = 0.2
MB = 1024 * 1024


def rss_bytes(client: httpx.Client, base_url: str) -> float | None:
    """The RSS a service reports on its /metrics, or None if it does not answer."""
    try:
        response = client.get(f"{base_url}/metrics", params={"name[]": "process_resident_memory_bytes"})
    except httpx.HTTPError:
        return None
    match = _RSS.search(response.text) if response.status_code == 200 else None
    return float(match.group(1)) if match else None


class MemorySampler(threading.Thread):
    """samples: [(seconds since start, {service: RSS bytes or None})]"""

    def __init__(self, targets: dict[str, str], period: float):
        super().__init__(daemon=True, name="memory-sampler")
        self.targets, self.period = targets, period
        self.samples: list[tuple[float, dict[str, float | None]]] = []
        self._halt = threading.Event()
        self._began = time.monotonic()

    def run(self) -> None:
        with httpx.Client(timeout=5) as client:
            while True:
                at = time.monotonic() - self._began
                self.samples.append((at, {name: rss_bytes(client, url) for name, url in self.targets.items()}))
                if self._halt.wait(self.period):
                    break

    def stop(self) -> list[tuple[float, dict[str, float | None]]]:
        """Takes a last sample and returns them all."""
        self._halt.set()
        self.join()
        return self.samples


def growth(samples, duration_s: float) -> dict[str, dict]:
    """Per service: RSS after warm-up, at the end, and the growth between them (MB and %)."""
    out = {}
    for name in (samples[0][1] if samples else {}):
        series = [(t, s[name]) for t, s in samples if s.get(name) is not None]
        if not series:
            out[name] = None
            continue
        after = [(t, v) for t, v in series if t >= WARM_UP * duration_s] or series[-1:]
        base, end = after[0][1], series[-1][1]
        out[name] = {"warm_mb": round(base / MB, 1), "end_mb": round(end / MB, 1),
                     "peak_mb": round(max(v for _, v in series) / MB, 1),
                     "growth_mb": round((end - base) / MB, 1),
                     "growth_pct": round(100 * (end - base) / base, 1) if base else None}
    return out


def table(samples, duration_s: float, rows: int = 12) -> str:
    """RSS in MB over time (at most `rows` evenly spread samples), then the growth after warm-up."""
    if not samples:
        return "memory: no samples"
    names = list(samples[0][1])
    width = max(10, *(len(n) + 2 for n in names))
    picked = samples if len(samples) <= rows else \
        [samples[round(i * (len(samples) - 1) / (rows - 1))] for i in range(rows)]
    lines = ["RSS (MB) per service over time, from process_resident_memory_bytes:",
             f"{'t':>8}" + "".join(f"{n:>{width}}" for n in names)]
    for at, values in picked:
        lines.append(f"{at:>7.0f}s" + "".join(
            f"{(values[n] / MB if values[n] is not None else float('nan')):>{width}.1f}" for n in names))
    lines.append(f"growth after warm-up (first {WARM_UP:.0%} of {duration_s:.0f}s) to the end:")
    for name, g in growth(samples, duration_s).items():
        if g is None:
            lines.append(f"  {name:<14} no samples (its /metrics did not answer)")
        else:
            pct = f"{g['growth_pct']:+.1f}%" if g["growth_pct"] is not None else "-"
            lines.append(f"  {name:<14} {g['warm_mb']:>7.1f} -> {g['end_mb']:>7.1f} MB   "
                         f"{g['growth_mb']:+6.1f} MB  {pct:>7}   (peak {g['peak_mb']:.1f} MB)")
    return "\n".join(lines)
