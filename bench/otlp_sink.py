"""Stands in for Jaeger when measuring what tracing costs: accepts OTLP/HTTP exports and discards them.

    python bench/otlp_sink.py 4318 &
    OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:4318 make bench BENCH_ARGS=--skip-celery

It does not decode what it gets, so its own CPU (a collector's, elsewhere in production) stays out of
the platform's figures; on SIGTERM it prints how many exports and bytes it took.
"""

import asyncio
import signal
import sys


async def main(port: int) -> None:
    counts = {"exports": 0, "bytes": 0}

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while request := await reader.readline():
                length = 0
                while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                await reader.readexactly(length)
                counts["exports"] += request.startswith(b"POST /v1/traces")
                counts["bytes"] += length
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/x-protobuf\r\nContent-Length: 0\r\n\r\n")
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", port)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    asyncio.get_running_loop().add_signal_handler(signal.SIGINT, stop.set)
    async with server:
        await stop.wait()
    print(f"otlp sink: {counts['exports']} exports, {counts['bytes']} bytes", flush=True)


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 4318))
