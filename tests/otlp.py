"""An OTLP/HTTP trace receiver for tests: what Jaeger's port 4318 would get, decoded from the real protobuf."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.trace.v1.trace_pb2 import Span as SpanProto

KINDS = {SpanProto.SPAN_KIND_INTERNAL: "INTERNAL", SpanProto.SPAN_KIND_SERVER: "SERVER",
         SpanProto.SPAN_KIND_CLIENT: "CLIENT", SpanProto.SPAN_KIND_PRODUCER: "PRODUCER",
         SpanProto.SPAN_KIND_CONSUMER: "CONSUMER"}


def _value(any_value):
    kind = any_value.WhichOneof("value")
    return getattr(any_value, kind) if kind else None


@dataclass
class Span:
    trace_id: str
    span_id: str
    parent_id: str
    name: str
    kind: str
    service: str
    attributes: dict
    links: list[tuple[str, str]] = field(default_factory=list)  # (trace id, span id)
    error: bool = False


class OtlpReceiver:
    """Serves POST /v1/traces on a loopback port and keeps every span it is sent."""

    def __init__(self):
        self.spans: list[Span] = []
        self.raw: list[bytes] = []  # each export request's body as sent: resources, events, statuses and all
        self.requests = 0
        self._server: asyncio.AbstractServer | None = None

    @property
    def endpoint(self) -> str:
        host, port = self._server.sockets[0].getsockname()[:2]
        return f"http://{host}:{port}"

    async def start(self) -> OtlpReceiver:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return self

    async def close(self) -> None:
        self._server.close()
        await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                request_line = await reader.readline()
                if not request_line:
                    return
                headers = {}
                while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
                    name, _, value = line.decode("latin-1").partition(":")
                    headers[name.strip().lower()] = value.strip()
                body = await reader.readexactly(int(headers.get("content-length", 0)))
                if request_line.split()[1] == b"/v1/traces":
                    self._keep(body)
                    status, reply = b"200 OK", ExportTraceServiceResponse().SerializeToString()
                else:
                    status, reply = b"404 Not Found", b""
                writer.write(b"HTTP/1.1 " + status + b"\r\nContent-Type: application/x-protobuf\r\n"
                             b"Content-Length: " + str(len(reply)).encode() + b"\r\n\r\n" + reply)
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    def _keep(self, body: bytes) -> None:
        request = ExportTraceServiceRequest.FromString(body)
        self.raw.append(body)
        self.requests += 1
        for resource_spans in request.resource_spans:
            resource = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    self.spans.append(Span(
                        trace_id=span.trace_id.hex(), span_id=span.span_id.hex(),
                        parent_id=span.parent_span_id.hex(), name=span.name, kind=KINDS.get(span.kind, "UNSPECIFIED"),
                        service=resource.get("service.name", ""),
                        attributes={a.key: _value(a.value) for a in span.attributes},
                        links=[(link.trace_id.hex(), link.span_id.hex()) for link in span.links],
                        error=span.status.code == span.status.STATUS_CODE_ERROR))

    def trace(self, trace_id: str) -> list[Span]:
        return [s for s in self.spans if s.trace_id == trace_id]
