"""Weights from S3 into the node cache: one GET stream per file, one file after another
(what a plain copy does), against the weights fetcher (:mod:`pipeline.transfer`: parallel
ranged GETs, several files at once, each checked against its ETag), both in one run on the
same objects. The tree is random bytes shaped like a weights tree (one large file, a few
medium, many small), uploaded as ``aws s3 cp`` would (multipart above 8 MiB).

Without ``--s3-endpoint`` a SeaweedFS server is started on loopback for the run (the test
server the suite uses); with it, credentials come from the environment as usual.

Each way is measured twice: straight to the server, and through a loopback proxy that holds
every connection to ``--stream-mbps`` (default 50 MB/s), as one TCP stream to a remote object
store is held by its round trips and window; on loopback alone nothing limits a stream but
this machine's CPU, which the server shares."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

from .common import Results, summarize

COLUMNS = ("method", "endpoint", "link", "files", "bytes", "part_mib", "workers", "files_at_once", "median_s", "min_s",
           "spread_pct", "mb_per_s", "speedup_vs_one_stream", "check")
BUCKET = "bench-fetch"
PREFIX = "tree"


def tree_sizes(total_mib: int) -> dict[str, int]:
    """Relative path -> bytes: half the total in one file, a third in three, the rest in small ones."""
    mib = 1024 * 1024
    sizes = {"unet/diffusion_pytorch_model.safetensors": total_mib * mib // 2}
    for i in range(3):
        sizes[f"text_encoder_{i}/model.safetensors"] = total_mib * mib // 9
    for i in range(24):
        sizes[f"configs/file_{i:02d}.json"] = 4096 + 997 * i
    rest = total_mib * mib - sum(sizes.values())
    if rest > 0:
        sizes["vae/diffusion_pytorch_model.safetensors"] = rest
    return sizes


def upload_tree(client, total_mib: int, workdir: Path) -> tuple[int, int]:
    from boto3.s3.transfer import TransferConfig

    client.create_bucket(Bucket=BUCKET)
    config = TransferConfig(multipart_threshold=8 * 1024 * 1024, multipart_chunksize=8 * 1024 * 1024)
    total = 0
    sizes = tree_sizes(total_mib)
    for relative, size in sizes.items():
        local = workdir / "upload.bin"
        with open(local, "wb") as handle:
            left = size
            while left:
                piece = os.urandom(min(left, 4 * 1024 * 1024))
                handle.write(piece)
                left -= len(piece)
        client.upload_file(str(local), BUCKET, f"{PREFIX}/{relative}", Config=config)
        total += size
    (workdir / "upload.bin").unlink(missing_ok=True)
    return len(sizes), total


class StreamCap:
    """A loopback TCP proxy to ``upstream`` (host, port) that sends each connection's
    answers at most ``bytes_per_s`` (requests pass as they come). ``with StreamCap(...) as
    cap: cap.endpoint``."""

    def __init__(self, upstream: tuple[str, int], bytes_per_s: float) -> None:
        self.upstream, self.rate = upstream, bytes_per_s
        self.endpoint = ""
        self._loop = None
        self._thread = None
        self._server = None
        self._writers: set = set()

    async def _close(self) -> None:
        self._server.close()
        for writer in list(self._writers):
            writer.close()
        await self._server.wait_closed()

    async def _pipe(self, reader, writer, capped: bool) -> None:
        import asyncio

        free_at = time.monotonic()  # when the connection may send again (no credit saved up while idle)
        self._writers.add(writer)
        try:
            while True:
                data = await reader.read(64 * 1024)
                if not data:
                    break
                if capped:  # up to 5 ms a sleep overslept is made up; an idle pause is not
                    free_at = max(free_at, time.monotonic() - 0.005) + len(data) / self.rate
                writer.write(data)
                await writer.drain()
                if capped and free_at > time.monotonic():
                    await asyncio.sleep(free_at - time.monotonic())
        except (ConnectionError, OSError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()

    async def _handle(self, client_reader, client_writer) -> None:
        import asyncio

        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            client_writer.close()
            return
        await asyncio.gather(self._pipe(client_reader, upstream_writer, False),
                             self._pipe(upstream_reader, client_writer, True))

    def __enter__(self) -> "StreamCap":
        import asyncio
        import threading

        ready = threading.Event()

        def serve() -> None:
            self._loop = asyncio.new_event_loop()
            self._server = self._loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", 0))
            self.endpoint = f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
            ready.set()
            self._loop.run_forever()
            self._loop.close()

        self._thread = threading.Thread(target=serve, daemon=True)
        self._thread.start()
        ready.wait(30)
        return self

    def __exit__(self, *exc) -> None:
        import asyncio

        asyncio.run_coroutine_threadsafe(self._close(), self._loop).result(timeout=30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=30)


def one_stream(client, target: Path) -> float:
    """Each object with one GET, read to the end into its file, one after another."""
    started = time.perf_counter()
    paginator = client.get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=BUCKET, Prefix=f"{PREFIX}/"):
        for item in page.get("Contents", []):
            path = target / item["Key"]
            path.parent.mkdir(parents=True, exist_ok=True)
            body = client.get_object(Bucket=BUCKET, Key=item["Key"])["Body"]
            with open(path, "wb") as handle:
                for chunk in body.iter_chunks(1024 * 1024):
                    handle.write(chunk)
    return time.perf_counter() - started


def fetcher(endpoint: str, target: Path, part_bytes: int, workers: int) -> tuple[float, set[str]]:
    """The weights fetcher on the whole tree; its seconds and the checks its files got."""
    from pipeline.weights import _Fetcher

    fetch = _Fetcher(target, endpoint)
    fetch.part_bytes, fetch.workers = part_bytes, workers
    started = time.perf_counter()
    fetch.fetch(f"s3://{BUCKET}/{PREFIX}", lambda relative, everything: True)
    return time.perf_counter() - started, {fetched.check for fetched in fetch.fetched}


def run_fetching(out: Path, *, total_mib: int, repeats: int, warmup: int, endpoint: str | None = None,
                 part_mib: int = 8, workers: int = 8, stream_mbps: float = 50.0) -> Results:
    from pipeline.s3 import s3_client
    from pipeline.weights import FILES_AT_ONCE

    results = Results(out, "fetching", COLUMNS, repeats=repeats, warmup=warmup,
                      title="Weights from S3 into the node cache: one stream per file vs parallel ranged GETs",
                      table=("method", "endpoint", "link", "bytes", "part_mib", "workers", "median_s", "mb_per_s",
                             "speedup_vs_one_stream", "check"))
    workdir = Path(tempfile.mkdtemp(prefix="bf-", dir="/tmp"))
    server = None
    try:
        if endpoint is None:
            from tests.s3server import SeaweedFS

            server = SeaweedFS(workdir / "seaweedfs").__enter__()
            os.environ.update(server.env())
            endpoint, where = server.endpoint, "SeaweedFS (loopback)"
        else:
            where = "given endpoint"
        files, size = upload_tree(s3_client(endpoint), total_mib, workdir)

        def fresh() -> Path:
            target = workdir / "cache"
            shutil.rmtree(target, ignore_errors=True)
            target.mkdir()
            return target

        from urllib.parse import urlsplit

        upstream = urlsplit(endpoint)
        for link in ("direct", f"{stream_mbps:g} MB/s per connection"):
            cap = StreamCap((upstream.hostname, upstream.port), stream_mbps * 1e6) if link != "direct" else None
            if cap is not None:
                cap.__enter__()
            try:
                url = cap.endpoint if cap is not None else endpoint
                client = s3_client(url)
                timings: dict[str, list[float]] = {"one_stream": [], "parallel_ranged": []}
                checks: set[str] = set()
                for round_ in range(warmup + repeats):
                    for method in timings:  # alternating, so both see the same server state
                        target = fresh()
                        if method == "one_stream":
                            seconds = one_stream(client, target)
                        else:
                            seconds, seen = fetcher(url, target, part_mib * 1024 * 1024, workers)
                            checks |= seen
                        if round_ >= warmup:
                            timings[method].append(seconds)
            finally:
                if cap is not None:
                    cap.__exit__(None, None, None)
            base = summarize(timings["one_stream"])["median"]
            for method, seconds in timings.items():
                stats = summarize(seconds)
                parallel = method == "parallel_ranged"
                results.add(case=f"{method}_{'direct' if cap is None else 'capped'}", method=method,
                            endpoint=where, link=link, files=files, bytes=size,
                            part_mib=part_mib if parallel else "whole", workers=workers if parallel else 1,
                            files_at_once=FILES_AT_ONCE if parallel else 1, median_s=stats["median"], min_s=stats["min"],
                            spread_pct=stats["spread_pct"], mb_per_s=size / stats["median"] / 1e6,
                            speedup_vs_one_stream=base / stats["median"],
                            check=",".join(sorted(checks)) if parallel else "none")
    finally:
        if server is not None:
            server.__exit__(None, None, None)
        shutil.rmtree(workdir, ignore_errors=True)
    results.close()
    return results
