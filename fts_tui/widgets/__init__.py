"""Widgets of the fts cockpit; each one redraws from the run state when the app's timer says it changed."""

from fts_tui.widgets.chart import Chart
from fts_tui.widgets.event_log import EventLog
from fts_tui.widgets.header import RunHeader
from fts_tui.widgets.schedule import ScheduleTable

__all__ = ["Chart", "EventLog", "RunHeader", "ScheduleTable"]
