"""jobs_pacing.rest_after: a job's request slot is busy at most `duty` of the time while
realtime requests arrive, and never rests without them."""

from __future__ import annotations

import pytest

from services.gateway.jobs_pacing import REALTIME_WINDOW_S, rest_after
from services.gateway.jobs_wiring import check_job_settings
from services.gateway.settings import GatewaySettings
from services.mesh.domain.errors import InvalidInput


@pytest.mark.parametrize(("duty", "rest"), [(0.5, 0.004), (0.25, 0.012), (0.8, 0.001)])
def test_a_slot_rests_so_that_it_is_busy_duty_of_the_time(duty: float, rest: float) -> None:
    assert rest_after(0.004, duty=duty, realtime_age_s=0.0) == pytest.approx(rest)
    busy = 0.004
    assert busy / (busy + rest_after(busy, duty=duty, realtime_age_s=0.0)) == pytest.approx(duty)


def test_no_rest_at_duty_one_without_realtime_requests_or_for_nothing_done() -> None:
    assert rest_after(0.004, duty=1.0, realtime_age_s=0.0) == 0.0
    assert rest_after(0.004, duty=0.5, realtime_age_s=REALTIME_WINDOW_S + 0.01) == 0.0
    assert rest_after(0.004, duty=0.5, realtime_age_s=float("inf")) == 0.0
    assert rest_after(0.0, duty=0.5, realtime_age_s=0.0) == 0.0


@pytest.mark.parametrize("duty", [0.0, -0.5, 1.5])
def test_a_duty_outside_zero_to_one_fails_at_start_naming_the_setting(duty: float) -> None:
    check_job_settings(GatewaySettings(job_duty=1.0))
    with pytest.raises(InvalidInput, match="INFERMESH_GATEWAY_JOB_DUTY: must be within"):
        check_job_settings(GatewaySettings(job_duty=duty))
