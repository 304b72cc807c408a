"""Prometheus metrics (prometheus-client), one registry per app so several apps can live in one process."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter("sdrt_requests", "HTTP requests by route and status", ["route", "status"],
                                registry=self.registry)
        self.request_seconds = Histogram("sdrt_request_seconds", "HTTP request latency", ["route"],
                                         buckets=LATENCY_BUCKETS, registry=self.registry)
        self.queue_depth = Gauge("sdrt_queue_depth", "jobs waiting in the queue", registry=self.registry)
        self.running = Gauge("sdrt_jobs_running", "jobs running", registry=self.registry)
        self.job_seconds = Histogram("sdrt_job_seconds", "job latency from submission to result",
                                     buckets=LATENCY_BUCKETS, registry=self.registry)
        self.stage_seconds = Counter("sdrt_stage_seconds", "seconds spent per pipeline stage", ["stage"],
                                     registry=self.registry)
        self.images = Counter("sdrt_images_generated", "images generated", registry=self.registry)
        self.jobs = Counter("sdrt_jobs", "finished jobs by state", ["state"], registry=self.registry)

    def observe_request(self, route: str, status: int, seconds: float) -> None:
        self.requests.labels(route=route, status=str(status)).inc()
        self.request_seconds.labels(route=route).observe(seconds)

    def observe_result(self, result, seconds: float) -> None:
        self.job_seconds.observe(seconds)
        self.images.inc(len(result.images))
        for stage, value in result.timings.items():
            self.stage_seconds.labels(stage=stage).inc(float(value))

    def render(self, depth: int | None = None, running: int | None = None) -> tuple[bytes, str]:
        if depth is not None:
            self.queue_depth.set(depth)
        if running is not None:
            self.running.set(running)
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
