"""The prediction log's sustained write rate into Postgres, and its CPU per 1,000 rows.

    python -m bench.predlog_rate [--rows 20000] [--in-bytes 8192] [--out-bytes 1024]
                                 [--policy full|digest] [--window 500] [--fast-postgres]
                                 [--out FILE]

A private Postgres is started in a temporary directory (`deploy.localdeps.start_postgres`,
durable settings unless `--fast-postgres`), migrated (`services.mesh.infra.db.migrate`), and
written to by the routers' own code path: a `services.predlog.PredictionLog` whose `record()`
is called as a router calls it, with one FP32 input of `--in-bytes` and one FP32 output of
`--out-bytes`, under the version's logging policy (`full`: tensors as JSON; `digest`: a sha256
per tensor). Like requests in flight, `--window` records are recorded and their journal futures
awaited before the next ones; then `flush()` waits until every row is in Postgres.

Reported: rows/s and MB/s (raw tensor bytes, and the bytes the table and its indexes grew by)
from the first record to the end of the flush; CPU seconds per 1,000 rows of this process (the
writer: building records, converting rows, journaling, COPY; the synthetic records' own cost is
a few µs each) and of every Postgres process (`/proc/<pid>/stat`, see `bench.proc_cpu`).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import NamedTuple

import asyncpg
import numpy as np
import orjson
from prometheus_client import CollectorRegistry

from bench import proc_cpu
from deploy.localdeps import start_postgres
from services.mesh.domain.tensors import Tensor
from services.mesh.domain.types import InferRequest, InferResponse
from services.mesh.infra.db import migrate
from services.predlog.log import PredictionLog
from services.predlog.spool import Spool
from services.predlog.table import PredictionTable

POLICIES = ("full", "digest")
_VARIANTS = 16
"""Distinct input/output tensors the records cycle through (so rows are not all alike)."""
_WARMUP_ROWS = 100
"""Rows written before measuring: the day partition, the connection's first COPY."""
_STORED_BYTES = """
SELECT coalesce(sum(pg_total_relation_size(inhrelid)), 0)::bigint
  FROM pg_inherits WHERE inhparent = 'predictions'::regclass
"""
_WAL_POSITION = "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::bigint"


@dataclass(frozen=True)
class RateResult:
    """What one run measured."""

    rows: int
    in_bytes: int
    out_bytes: int
    policy: str
    seconds: float
    """From the first measured record to the end of the flush (every row in Postgres; the
    two size queries after the flush are inside it, a millisecond or two)."""
    journal_seconds: float
    """From the first measured record until the last was journaled (answers released)."""
    rows_in_table: int
    stored_bytes: int
    """Growth of the `predictions` partitions (heap, TOAST, indexes) over the run."""
    wal_bytes: int
    """Write-ahead log Postgres wrote over the run (the whole cluster: this run alone)."""
    writer_cpu_s: float
    postgres_cpu_s: float
    dropped: int

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.seconds

    @property
    def raw_mb_per_s(self) -> float:
        return self.rows * (self.in_bytes + self.out_bytes) / self.seconds / 1e6

    @property
    def stored_mb_per_s(self) -> float:
        return self.stored_bytes / self.seconds / 1e6

    def per_1000(self, cpu_s: float) -> float:
        """CPU seconds per 1,000 rows."""
        return cpu_s * 1000 / self.rows

    def to_dict(self) -> dict[str, object]:
        return {**asdict(self), "rows_per_s": self.rows_per_s, "raw_mb_per_s": self.raw_mb_per_s,
                "stored_mb_per_s": self.stored_mb_per_s,
                "stored_bytes_per_row": self.stored_bytes / self.rows,
                "wal_bytes_per_row": self.wal_bytes / self.rows,
                "writer_cpu_s_per_1000": self.per_1000(self.writer_cpu_s),
                "postgres_cpu_s_per_1000": self.per_1000(self.postgres_cpu_s)}

    def markdown(self) -> str:
        head = ("| policy | in / out bytes | rows | rows/s | raw MB/s | stored MB/s "
                "| stored B/row | WAL B/row | writer CPU s / 1k rows | Postgres CPU s / 1k rows |")
        return "\n".join([
            head, "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
            f"| {self.policy} | {self.in_bytes:,} / {self.out_bytes:,} | {self.rows:,} "
            f"| {self.rows_per_s:,.0f} | {self.raw_mb_per_s:.2f} | {self.stored_mb_per_s:.2f} "
            f"| {self.stored_bytes / self.rows:,.0f} | {self.wal_bytes / self.rows:,.0f} "
            f"| {self.per_1000(self.writer_cpu_s):.3f} "
            f"| {self.per_1000(self.postgres_cpu_s):.3f} |",
        ])


def _tensor_bytes(text: str) -> int:
    value = int(text)
    if value < 4 or value % 4:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive multiple of 4 (FP32)")
    return value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.predlog_rate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=20_000, help="rows measured")
    parser.add_argument("--in-bytes", type=_tensor_bytes, default=8192,
                        help="raw bytes of the FP32 input tensor (a multiple of 4)")
    parser.add_argument("--out-bytes", type=_tensor_bytes, default=1024,
                        help="raw bytes of the FP32 output tensor (a multiple of 4)")
    parser.add_argument("--policy", choices=POLICIES, default="full", help="logging policy")
    parser.add_argument("--window", type=int, default=500,
                        help="records in flight (recorded, awaiting the journal) at a time")
    parser.add_argument("--fast-postgres", action="store_true",
                        help="fsync, synchronous_commit and full_page_writes off (test clusters)")
    parser.add_argument("--out", type=Path,
                        help="JSON path (default bench/results/predlog-rate-DATE.json)")
    args = parser.parse_args(argv)
    if args.rows < 1:
        parser.error("--rows must be at least 1")
    if not 1 <= args.window <= 5000:
        parser.error("--window must be between 1 and 5000 (the log buffers 10,000 records)")
    return args


def _tensors(name: str, size: int, rng: np.random.Generator) -> list[Tensor]:
    width = size // 4
    return [Tensor.from_array(name, rng.standard_normal((1, width), dtype=np.float32))
            for _ in range(_VARIANTS)]


class Feeder:
    """Records synthetic predictions the way a router does."""

    def __init__(self, log: PredictionLog, *, in_bytes: int, out_bytes: int, policy: str,
                 window: int) -> None:
        rng = np.random.default_rng(17)
        self._log = log
        self._inputs = _tensors("features", in_bytes, rng)
        self._outputs = _tensors("scores", out_bytes, rng)
        self._policy = policy
        self._window = window
        self.dropped = 0

    async def feed(self, rows: int, prefix: str) -> None:
        """Record `rows` predictions, `window` at a time, each window awaited on the journal."""
        for start in range(0, rows, self._window):
            pending = [self._record(f"{prefix}{i}", i)
                       for i in range(start, min(rows, start + self._window))]
            waits = [done for done in pending if done is not None]
            self.dropped += len(pending) - len(waits)
            await asyncio.gather(*waits)

    def _record(self, request_id: str, i: int) -> asyncio.Future[None] | None:
        variant = i % _VARIANTS
        request = InferRequest("bench", [self._inputs[variant]], request_id, tenant="bench")
        response = InferResponse("bench", "1", request_id, [self._outputs[variant]])
        return self._log.record(request, response, received=time.time(), latency=0.002,
                                policy=self._policy)


class Counters(NamedTuple):
    """What grows while rows are written, read at one moment."""

    at: float
    writer_cpu_s: float
    postgres_cpu_s: float
    stored_bytes: int
    wal_bytes: int

    @classmethod
    async def read(cls, reader: asyncpg.Connection, postmaster: int) -> Counters:
        """This process's CPU, the Postgres tree's under `postmaster`, table and WAL sizes."""
        stored: int = await reader.fetchval(_STORED_BYTES)
        wal: int = await reader.fetchval(_WAL_POSITION)
        writer = proc_cpu.read_stat(os.getpid())
        postgres = sum(proc_cpu.tree_cpu([postmaster]).values())
        return cls(time.perf_counter(), 0.0 if writer is None else writer.cpu_s, postgres,
                   stored, wal)


async def measure(dsn: str, postmaster: int, spool_root: Path,
                  args: argparse.Namespace) -> RateResult:
    """Write `args.rows` rows through a PredictionLog into `dsn`; CPU of this process and of
    the Postgres tree under `postmaster`."""
    table = PredictionTable(dsn)
    await table.connect()  # its backend exists before the CPU baseline is read
    log = PredictionLog(table, Spool(spool_root, "bench", max_bytes=8 << 30),
                        registry=CollectorRegistry())
    await log.start()
    feeder = Feeder(log, in_bytes=args.in_bytes, out_bytes=args.out_bytes,
                    policy=args.policy, window=args.window)
    reader = await asyncpg.connect(dsn)
    try:
        await feeder.feed(_WARMUP_ROWS, "warmup-")
        await log.flush()
        feeder.dropped = 0
        before = await Counters.read(reader, postmaster)
        await feeder.feed(args.rows, "r-")
        journaled = time.perf_counter()
        await log.flush()
        after = await Counters.read(reader, postmaster)
        count: int = await reader.fetchval(
            "SELECT count(*) FROM predictions WHERE request_id LIKE 'r-%'")
    finally:
        await reader.close()
        await log.aclose()
    return RateResult(
        args.rows, args.in_bytes, args.out_bytes, args.policy, after.at - before.at,
        journaled - before.at, count, after.stored_bytes - before.stored_bytes,
        after.wal_bytes - before.wal_bytes, after.writer_cpu_s - before.writer_cpu_s,
        after.postgres_cpu_s - before.postgres_cpu_s, feeder.dropped,
    )


async def _migrate(dsn: str) -> None:
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=1)
    try:
        await migrate(pool)
    finally:
        await pool.close()


def run(args: argparse.Namespace) -> RateResult:
    """Start a private Postgres, migrate it, measure, stop it and remove its directory."""
    # Not 0700: when we are root the cluster runs as `postgres`, which must reach its data dir.
    root = Path(tempfile.mkdtemp(prefix="infermesh-predlog-rate-"))
    root.chmod(0o755)
    try:
        with start_postgres(root / "data", fast=args.fast_postgres) as postgres:
            assert postgres.pid is not None
            dsn = postgres.create_database("predlog_rate")
            asyncio.run(_migrate(dsn))
            spool = root / "spool"
            spool.mkdir(mode=0o700)
            return asyncio.run(measure(dsn, postgres.pid, spool, args))
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = datetime.now(UTC)
    load = os.getloadavg()
    result = run(args)
    if result.rows_in_table != result.rows or result.dropped:
        print(f"only {result.rows_in_table:,} of {result.rows:,} rows reached the table "
              f"({result.dropped:,} dropped)", file=sys.stderr)
        return 1
    command = shlex.join(["python", "-m", "bench.predlog_rate", *(argv or sys.argv[1:])])
    print(f"{command}\n{started:%Y-%m-%d %H:%M} UTC, load average before "
          f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}, {os.cpu_count()} CPUs\n")
    print(result.markdown())
    out = args.out or Path("bench/results") / f"predlog-rate-{started:%Y-%m-%dT%H%M%SZ}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(orjson.dumps({"command": command, "started": started.isoformat(),
                                  "load_average": load, **result.to_dict()},
                                 option=orjson.OPT_INDENT_2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
