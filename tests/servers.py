"""Old import path of `support.servers`, for test files not moved to it yet."""

from __future__ import annotations

from support.servers import REQUIRED_SCOPES as REQUIRED_SCOPES
from support.servers import RunningBroker as RunningBroker
from support.servers import RunningSandbox as RunningSandbox
from support.servers import ThreadedLoop as ThreadedLoop
from support.servers import broker_settings as broker_settings
from support.servers import start_app as start_app
from support.servers import start_broker as start_broker
