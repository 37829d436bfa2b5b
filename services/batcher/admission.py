"""Admission by predicted latency: refuse at once what cannot finish before its deadline.

Clockwork's rule (OSDI 2020), on one version's queue: a request arriving behind
`queued_rows` rows completes, at the earliest, once the version's workers have worked those
rows off at their full-batch throughput, the running batch has ended and its own batch has
run. If that passes its deadline it is refused now, with the time the backlog needs to clear
as its Retry-After, instead of queuing until the deadline and answering 504 late. Pure
functions: the core measures the inputs (`latency.VersionLatency`, `FairQueue.standing`) and
passes them in.

The rows ahead are those the queue will run before the request (`rows_ahead`), not all it
holds: within a tenant the queue is earliest deadline first, so a 1 s request is judged by the
rows due before it, not by the 3 s requests that arrived first. Admitting it may then push
already-admitted later-due rows past their deadlines; they were admitted on a prediction, and
the queue does not preempt them or take the admission back: they run late or time out (504)
as they would behind any arrival the prediction could not foresee.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

from services.batcher.policy import MAX_RETRY_AFTER, MIN_RECHECK


@dataclass(frozen=True, slots=True)
class Backlog:
    """What stands between an arriving request and its batch.

    `queued_rows`: rows ahead of it (queued, and formed batches not yet running);
    `throughput`: rows per second the version's workers sustain together (None: unknown);
    `running_predicted`: seconds the batch running on the soonest-free worker takes by the
    latency model (0: none runs); `running_for`: seconds it has run so far.
    """

    queued_rows: int
    throughput: float | None
    running_predicted: float = 0.0
    running_for: float = 0.0

    @property
    def running_left(self) -> float:
        """Seconds until the soonest worker is free, by the latency model."""
        return max(0.0, self.running_predicted - self.running_for)

    def clears_in(self, margin: float = 1.0) -> float | None:
        """Seconds until the backlog is worked off (None: no model yet), with every predicted
        time stretched by `margin`. The running batch's whole time is stretched, less what it
        has run: stretching only what is left of it said a batch 0.25 s into a 0.3 s
        prediction, on a machine running batches at 2.2x, would end in 0.1 s, not 0.4 s (an
        encoder burst's 1 s requests admitted behind such batches missed)."""
        if self.throughput is None:
            return None
        running = max(0.0, self.running_predicted * margin - self.running_for)
        return running + self.queued_rows / self.throughput * margin


@dataclass(frozen=True, slots=True)
class Standing:
    """Where a request arriving now would stand in its version's queue.

    `higher_lanes`: rows queued in lanes served strictly before its own;
    `own_due_first`: its tenant's rows in its lane due no later than it (EDF runs them first);
    `quantum`: its tenant's rows of credit per round-robin visit in its lane;
    `others`: (rows queued, rows of credit per visit) of each other tenant in its lane.
    """

    higher_lanes: int
    own_due_first: int
    quantum: float
    others: tuple[tuple[int, float], ...] = ()


def rows_ahead(standing: Standing, rows: int) -> int:
    """Rows the queue runs before an arriving request of `rows` rows.

    All of the higher lanes' rows and its tenant's earlier-due rows. Other tenants of its lane
    share rows with it by deficit round-robin, which ignores deadlines across tenants: while
    its tenant is served `own_due_first + rows` rows, over `n = ceil(that / quantum)` visits, a
    backlogged tenant with credit `q` per visit is served at most `q * (n + 1)` rows (the one
    extra visit: the round under way when it arrives), and never more than it holds. The bound
    leaves out credit a tenant carried over (less than one of its requests), bulk requests
    promoted into the realtime lane after waiting, and whatever arrives later in a higher lane.
    """
    own = standing.own_due_first + rows
    visits = math.ceil(own / standing.quantum) + 1
    others = sum(min(held, math.ceil(quantum * visits)) for held, quantum in standing.others)
    return standing.higher_lanes + standing.own_due_first + others


HEADROOM = 1.25
"""What the batcher multiplies a predicted completion by before it compares it with the
deadline, until `Headroom` has seen enough batches to measure it. The model is seeded by the
worker's warm-up, run while nothing else ran, and refits only every few batches; in a burst the
gateway, router and batcher take CPU from the worker and its batches run slower than predicted
until the model catches up (a 160-request encoder burst on 2 cores: ~100 rows/s against a
prediction of ~130). A quarter more keeps what is admitted within its deadline."""
MIN_HEADROOM, MAX_HEADROOM = HEADROOM, 2.0
STRICT_MAX_HEADROOM = 2.5
"""`admission: strict` allows up to 2.5: in an encoder burst on 2 cores (480 requests/s
arriving, most of them refused) the batches ran up to 2.24x their prediction (the hops took
about a core)."""
HEADROOM_QUANTILE = 0.9
HEADROOM_WINDOW = 64
HEADROOM_MIN_BATCHES = 16
RECENT_MIN_SECONDS = 0.02
"""Batches predicted to run at least this long also set the headroom from the latest of them
(see `Headroom`): at that length a batch's slowness is the machine's state, which the next
batch shares, not scheduling noise."""


ARRIVALS_SAMPLE = 16
"""`Arrivals.rate` looks at the last 16 arrivals, and at the last 8 of them: at an encoder
burst's 480 requests per second it sees the burst within ~17 ms of its start, though the 16
include arrivals from before a lull; at a steady Poisson rate the 16 stray by ±25 % (the
sample's coefficient of variation, 1/sqrt(16)), and the 8 read twice the rate one time in 20."""
ARRIVALS_ONSET = 8
LEVEL_MEMORY_SECONDS = 120.0
"""How long `Headroom` trusts what a batch did at one arrival rate."""
LEVEL_SAMPLE = 8
"""Batches remembered per arrival-rate band: about two bursts' worth of encoder batches."""


class Arrivals:
    """The rate requests arrive at the batcher (every version's queue: each arrival costs the
    hops CPU, whatever it asks for), from the times of the last `ARRIVALS_SAMPLE`: the larger
    of the rate over all of them and over the last `ARRIVALS_ONSET` (a burst after a lull shows
    at once, not once it has pushed the lull out of the sample); 0 until `ARRIVALS_ONSET`
    requests have arrived (two close arrivals are not a burst)."""

    __slots__ = ("_times", "count")

    def __init__(self) -> None:
        self._times: deque[float] = deque(maxlen=ARRIVALS_SAMPLE)
        self.count = 0

    def note(self, now: float) -> None:
        self._times.append(now)
        self.count += 1

    def rate(self, now: float) -> float:
        """Requests per second (it falls by itself when arrivals stop)."""
        times = self._times
        held = len(times)
        if held < ARRIVALS_ONSET:
            return 0.0
        rate = held / max(now - times[0], 1e-3)
        if held > ARRIVALS_ONSET:
            onset = ARRIVALS_ONSET / max(now - times[held - ARRIVALS_ONSET], 1e-3)
            rate = max(rate, onset)
        return rate


def arrival_level(rate: float) -> int:
    """The power-of-two band of an arrival rate: 0 below 1 request/s, k for [2^(k-1), 2^k)."""
    return max(0, math.frexp(rate)[1])


class Headroom:
    """The multiplier admission applies to a predicted completion: the 90th percentile of
    actual ÷ predicted execution over the version's last 64 batches, held within [1.25, 2.0];
    `HEADROOM` until 16 batches have been timed.

    Under sustained CPU contention batches run slower than the line until it refits, and a
    fixed quarter is too little (admitted requests miss): the measured ratio raises the margin.
    It never goes below the quarter: a burst makes its own contention (the gateway, router and
    batcher parse and queue it on the worker's cores), which the batches timed before it do not
    show. A floor of 1.0 turned 41 of 160 admitted requests of an encoder burst into 504s on a
    busy machine (tests/integration/shared_mesh/test_mesh.py, the burst test), where 1.25 kept
    them within the test's bound. Recomputed every 16 batches (a sort of 64 floats).

    For long batches (`RECENT_MIN_SECONDS`) the margin is also, at every batch, at least the
    latest one's ratio, and after it the mean of the last ratio and the one before (a slow
    spell's excess halves with each calm batch): 16 of the encoder's batches are six seconds,
    and an encoder burst's own arrivals slowed its batches by 1.5-1.9x within the first of
    them, while the percentile still held the calm before (admitted 1 s requests then missed).

    Long batches also leave what they did at the arrival rate they ran under (`at`): a burst's
    own arrivals slow its batches, and the batches that drain it afterwards, with nothing
    arriving, run at the line again and bring the margin down before the next burst. So a burst
    started on the calm margin, and the 1 s requests admitted in its first ~100 ms, before its
    first batch had run long enough to tell, missed. Remembering the slowest of the last few
    batches per arrival rate lets admission use the last burst's slowness from the next
    burst's first arrivals on. The slowest, not a mean: within one encoder burst the batches ran
    1.2x to 2.2x, slower as the burst went on, and a request admitted at its start runs in
    those later batches.
    """

    __slots__ = ("_levels", "_ratios", "_recent", "_stale", "_value", "_window")

    def __init__(self) -> None:
        self._ratios: deque[float] = deque(maxlen=HEADROOM_WINDOW)
        self._value = self._window = HEADROOM
        self._recent = 0.0
        self._stale = 0
        self._levels: dict[int, deque[tuple[float, float]]] = {}
        """arrival_level -> (actual ÷ predicted, when) of the last long batches at that rate."""

    @property
    def value(self) -> float:
        return self._value

    def at(self, arrivals: Arrivals, now: float) -> float:
        """The margin for a request arriving now: `value`, or more where long batches ran
        slower than that (within `LEVEL_MEMORY_SECONDS`) while requests arrived in the
        power-of-two band of the rate now, or in the one above it: a 16-arrival estimate
        strays a band down now and then, and a burst should not slip back to the calm margin
        when it does. Slower bands count as well (a machine slow at a low rate is slow)."""
        if not self._levels:
            return self._value
        level = arrival_level(arrivals.rate(now)) + 1
        since = now - LEVEL_MEMORY_SECONDS
        margin = self._value
        for band, batches in self._levels.items():
            if band <= level:
                for ratio, when in batches:
                    if ratio > margin and when >= since:
                        margin = ratio
        return min(margin, STRICT_MAX_HEADROOM)

    def observe(self, predicted: float | None, actual: float, *, rate: float | None = None,
                now: float = 0.0) -> None:
        """One batch predicted to take `predicted` seconds took `actual`, while requests
        arrived at `rate` per second (None: not known), its end at `now` (monotonic)."""
        if predicted is None or predicted <= 0 or actual < 0:
            return
        ratio = actual / predicted
        if rate is not None and predicted >= RECENT_MIN_SECONDS:
            self._remember(arrival_level(rate), ratio, now)
        self._ratios.append(ratio)
        self._stale += 1
        if len(self._ratios) >= HEADROOM_MIN_BATCHES and self._stale >= HEADROOM_MIN_BATCHES:
            self._stale = 0
            ordered = sorted(self._ratios)
            self._window = ordered[min(len(ordered) - 1, int(HEADROOM_QUANTILE * len(ordered)))]
        elif predicted < RECENT_MIN_SECONDS:
            return
        if predicted >= RECENT_MIN_SECONDS:
            self._recent = max(ratio, (self._recent + ratio) / 2)
        self._value = min(max(self._window, self._recent, MIN_HEADROOM), MAX_HEADROOM)

    def _remember(self, level: int, ratio: float, now: float) -> None:
        batches = self._levels.get(level)
        if batches is None:
            batches = self._levels[level] = deque(maxlen=LEVEL_SAMPLE)
        batches.append((ratio, now))


def refusal(*, backlog: Backlog, execution: float | None, slack: float | None,
            enabled: bool = True, headroom: float = 1.0, stretch: bool = False) -> float | None:
    """None to admit; else the Retry-After (seconds) of a refusal.

    `execution`: predicted seconds of the request's own batch; `slack`: seconds until its
    deadline (None: no deadline). Admits whenever admission is off, there is no deadline or
    nothing is known yet; refuses when the predicted completion, times `headroom`, is later
    than the deadline (a completion exactly at the deadline is admitted). With `stretch`
    (`admission: strict`) the running batch's whole predicted time is stretched by
    `headroom`, less what it has run (`Backlog.clears_in`), not only what is left of it.
    """
    if not enabled or slack is None or execution is None:
        return None
    clears = backlog.clears_in(headroom if stretch else 1.0)
    if clears is None:
        return None
    if completion(clears, execution, headroom=headroom, stretch=stretch) <= slack:
        return None
    return min(max(clears, MIN_RECHECK), MAX_RETRY_AFTER)


def completion(clears: float, execution: float, *, headroom: float, stretch: bool) -> float:
    """Predicted seconds until a request is answered, with the margin: after the rows ahead
    of it (`clears`, from `Backlog.clears_in`, which already stretched the backlog when
    `stretch`) and its own batch's `execution`."""
    return clears + execution * headroom if stretch else (clears + execution) * headroom


def displaces(*, backlog: Backlog, rows: int, execution: float | None, slack: float | None,
              headroom: float = 1.0, stretch: bool = False) -> bool:
    """Whether queuing `rows` more rows ahead of an admitted request turns its predicted
    completion late: `backlog` is what stands before it now, `execution` its batch's predicted
    seconds, `slack` the seconds to its deadline. A request already predicted late is not
    protected (it is lost either way, and would otherwise block every earlier-due arrival).

    Earliest deadline first puts a 1 s arrival ahead of the 3 s requests queued before it; each
    of those was admitted on a prediction that did not know it would come. Without this check
    an encoder burst's 1 s arrivals pushed admitted 3 s requests past their deadlines (504s:
    attainment of admitted 80-89 %). The arrival is refused instead, as its own prediction
    would refuse it behind a backlog that long. Only the request that runs last is checked:
    it has the most rows ahead, and every arrival that delays an earlier one delays it too.
    """
    clears = backlog.clears_in(headroom if stretch else 1.0)
    if clears is None or execution is None or slack is None or not backlog.throughput:
        return False
    before = completion(clears, execution, headroom=headroom, stretch=stretch)
    after = before + rows / backlog.throughput * headroom
    return before <= slack < after
