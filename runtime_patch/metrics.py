"""ESamp's server-wide counters as Prometheus gauges, when SGLang runs with --enable-metrics.

SGLang runs prometheus_client in multiprocess mode (PROMETHEUS_MULTIPROC_DIR, set by the main
process only when metrics are enabled); gauges created in the scheduler process then appear on
the server's /metrics as ``esamp:<counter>``.
"""

from __future__ import annotations

import os


class EsampMetrics:
    def __init__(self, names: list[str]) -> None:
        from prometheus_client import Gauge

        self._gauges = {n: Gauge(name=f"esamp:{n}", documentation=f"ESamp {n.replace('_', ' ')}",
                                 multiprocess_mode="mostrecent") for n in names}

    def publish(self, report: dict) -> None:
        for name, gauge in self._gauges.items():
            gauge.set(report[name])


def metrics_if_enabled(names: list[str]) -> EsampMetrics | None:
    return EsampMetrics(names) if os.environ.get("PROMETHEUS_MULTIPROC_DIR") else None
