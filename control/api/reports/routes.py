"""REST route for model reports: decode the query string, one ReportStore call, encode."""

from __future__ import annotations

from aiohttp import web

from control.api.reports.store import ReportStore
from control.api.reports.validation import parse_report_query
from services.mesh.domain.errors import Unavailable
from services.mesh.transport.rest import json_response

REPORTS = web.AppKey("report_store", ReportStore)

reports = web.RouteTableDef()


@reports.get("/v1/models/{model}/report")
async def model_report(request: web.Request) -> web.Response:
    query = parse_report_query(request.query)
    store = request.app.get(REPORTS)
    if store is None:
        raise Unavailable("reports are not enabled on this control API")
    report = await store.report(request.match_info["model"], query)
    return json_response(report.to_json())


ROUTE_TABLES = (reports,)
