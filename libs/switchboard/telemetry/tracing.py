"""The OpenTelemetry plug-in: spans exported over OTLP, which Jaeger ingests natively.

On when the standard environment names an exporter or an OTLP endpoint (OTEL_TRACES_EXPORTER,
OTEL_EXPORTER_OTLP_ENDPOINT, OTEL_EXPORTER_OTLP_TRACES_ENDPOINT), off otherwise. The SDK reads the rest
itself: OTEL_TRACES_SAMPLER(_ARG), OTEL_RESOURCE_ATTRIBUTES, OTEL_SERVICE_NAME (default: the
service's own name), OTEL_EXPORTER_OTLP_HEADERS, OTEL_BSP_* (the bounded export queue).

Spans follow the messaging conventions: `publish <destination>` (PRODUCER) and `process <destination>`
(CONSUMER), with W3C traceparent in the AMQP headers. Only work that began traced is traced: a message
published with no trace context (a heartbeat, a registry sweep) makes no span, so background chatter does
not flood the trace store. Traces begin at the REST API (a SERVER span per request) and follow a workflow
through every process, because the workflow keeps its root's traceparent in the store.
"""

from __future__ import annotations

import os
from typing import Any

from opentelemetry import trace
from opentelemetry.trace import Link, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from switchboard import telemetry
from switchboard.telemetry import Batch, Call, Consumed, HttpRequest, Plugin, Published, TaskRun

_W3C = TraceContextTextMapPropagator()
_MAX_LINKS = 128
_UNTRACED_PATHS = frozenset({"/metrics", "/healthz", "/readyz"})  # probes and scrapes: a trace each would be noise


def enabled(environ=os.environ) -> bool:
    exporter = environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporter == "none" or environ.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return False
    return bool(exporter or environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
                or environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))


def configure(service: str, environ=os.environ) -> Tracing | None:
    """Installs the plug-in if the environment turns tracing on; returns it, or None."""
    if not enabled(environ) or telemetry.installed(Tracing):
        return None
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    named = "OTEL_SERVICE_NAME" in environ or "service.name=" in environ.get("OTEL_RESOURCE_ATTRIBUTES", "")
    provider = TracerProvider(resource=Resource.create({} if named else {"service.name": service}))
    for name in (environ.get("OTEL_TRACES_EXPORTER") or "otlp").split(","):
        provider.add_span_processor(BatchSpanProcessor(_exporter(name.strip().lower(), environ)))
    trace.set_tracer_provider(provider)  # handlers' own spans (OpenTelemetry's API) join the same traces
    return telemetry.install(Tracing(provider))


def _exporter(name: str, environ):
    if name == "otlp":
        protocol = environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        if protocol not in (None, "", "http/protobuf"):
            raise ValueError(f"OTLP protocol {protocol!r} is not supported: use http/protobuf (Jaeger: port 4318)")
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter()
    if name == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter()
    raise ValueError(f"OTEL_TRACES_EXPORTER={name!r}: use otlp, console or none")


def _context(traceparent: str | None):
    return _W3C.extract({"traceparent": traceparent}) if traceparent else None


def _unsampled(traceparent: str | None) -> bool:
    """A trace the sampler left out: its context is passed on as it is, and no span is made for it, so a
    sampled-out workflow costs a header, not a span per hop (the last two hex digits are the flags)."""
    return bool(traceparent) and len(traceparent) == 55 and not int(traceparent[-2:], 16) & 1


def _traceparent(span) -> str | None:
    ctx = span.get_span_context()
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}" if ctx.is_valid else None


def _destination(name: str, kind: str) -> str:
    if kind == "reply" or (kind == "control" and name.startswith("amq")):
        return "(temporary)"  # a queue of one process: its name is an id
    if kind == "events" and ".events." in name:
        # An api's own queue on the events exchange (<ns>.events.<owner>.<id>): named as the exchange
        # its publishes go to, so that a stream message's publish and process spans pair up.
        return name[:name.index(".events.") + len(".events")]
    return name.rsplit(".", 1)[0] if kind == "delay" else name


def _attributes(env, destination: str, operation: str) -> dict:
    attributes: dict[str, Any] = {"messaging.system": "rabbitmq", "messaging.destination.name": destination,
                                  "messaging.operation.type": operation}
    if env is not None:
        attributes["messaging.message.id"] = env.message_id
        attributes.update(_switchboard(env))
    return attributes


def _switchboard(item) -> dict:
    attributes = {}
    for key in ("workflow_id", "task_id"):
        value = getattr(item, key, None)
        if value:
            attributes[f"switchboard.{key}"] = value
    payload = getattr(item, "payload", None)
    if payload and isinstance(payload.get("capability"), str):
        attributes["switchboard.capability"] = payload["capability"]
    if getattr(item, "attempt", 0):
        attributes["switchboard.attempt"] = item.attempt
    return attributes


class Tracing(Plugin):
    def __init__(self, provider):
        self.provider = provider
        self.tracer = provider.get_tracer("switchboard")

    async def publish(self, message: Published, call_next: Call) -> Any:
        env = message.envelope
        if env is not None and _unsampled(env.traceparent):
            message.headers["traceparent"] = env.traceparent
            return await call_next()
        parent = _context(env.traceparent) if env is not None else None
        if parent is None:
            current = trace.get_current_span()
            if not current.get_span_context().is_valid:
                return await call_next()
            if not current.is_recording():
                _W3C.inject(message.headers)
                return await call_next()
        with self.tracer.start_as_current_span(
                f"publish {_destination(message.destination, message.kind)}", context=parent,
                kind=SpanKind.PRODUCER, attributes=_attributes(env, message.destination, "send")):
            _W3C.inject(message.headers)
            return await call_next()

    async def consume(self, message: Consumed, call_next: Call) -> Any:
        traceparent = message.traceparent
        if not traceparent or _unsampled(traceparent):
            return await call_next()  # the bus has put an unsampled traceparent on the envelope already
        parent = _context(traceparent)
        env = message.envelope
        with self.tracer.start_as_current_span(
                f"process {_destination(message.queue, message.kind)}", context=parent, kind=SpanKind.CONSUMER,
                attributes=_attributes(env, message.queue, "process")) as span:
            if env is not None:
                env.traceparent = _traceparent(span)  # what this message causes is caused here
            return await call_next()

    async def run_task(self, run: TaskRun, call_next: Call) -> Any:
        if _unsampled(run.envelope.traceparent):
            return await call_next()
        with self.tracer.start_as_current_span(
                f"run {run.capability}", attributes={**_switchboard(run.envelope), "switchboard.agent": run.agent},
                record_exception=False, set_status_on_exception=False) as span:
            try:
                return await call_next()
            finally:
                span.set_attribute("switchboard.outcome", run.outcome)
                if run.outcome not in ("succeeded", "cancelled"):
                    span.set_status(Status(StatusCode.ERROR, run.outcome))

    async def http_request(self, request: HttpRequest, call_next: Call) -> Any:
        if request.path in _UNTRACED_PATHS:
            return await call_next()
        with self.tracer.start_as_current_span(
                request.method, context=_context(request.headers.get("traceparent")), kind=SpanKind.SERVER,
                attributes={"http.request.method": request.method, "url.path": request.path}) as span:
            try:
                return await call_next()
            finally:
                span.update_name(f"{request.method} {request.route}")
                span.set_attribute("http.route", request.route)
                span.set_attribute("http.response.status_code", request.status)
                if request.status >= 500:
                    span.set_status(Status(StatusCode.ERROR))

    async def batch(self, batch: Batch, call_next: Call) -> Any:
        traced = [(item, _context(item.traceparent)) for item in batch.items
                  if item.traceparent and not _unsampled(item.traceparent)]
        if not traced:
            return await call_next()
        links = [Link(trace.get_current_span(ctx).get_span_context()) for _, ctx in traced[:_MAX_LINKS]]
        with self.tracer.start_as_current_span(f"{batch.name} batch", context=None, links=links,
                                               attributes={"messaging.batch.message_count": len(batch.items)}):
            spans = []
            for item, ctx in traced:
                span = self.tracer.start_span(batch.name, context=ctx, attributes=_switchboard(item))
                item.traceparent = _traceparent(span)
                spans.append(span)
            try:
                return await call_next()
            finally:
                for span in spans:
                    span.end()

    def traceparent(self) -> str | None:
        return _traceparent(trace.get_current_span())

    def close(self) -> None:
        self.provider.shutdown()  # exports what is still queued
